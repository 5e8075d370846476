"""The README's commands, run as written, in a shell where the README's own set-up has been done.

Every line of every ```bash block in README.md is either run here (commands that train get
smoke-sized overrides appended) or listed in EXEMPT with the reason; a line that is neither fails,
and so does an exemption the README no longer has. So a README that drifts from the code fails CI.
Commands run in order, in a scratch copy of the entry points with tiny CSVs in `data/`, so that
what one writes (a run in outputs/runs) is what the next one reads (`ckpt=outputs/runs`).
"""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from fmnist.data.csv_io import write_csv
from fmnist.runs import read_record
from tests.conftest import ROOT, make_images

pytestmark = pytest.mark.slow

EXEMPT = {
    "python train.py model=optimized trainer.accelerator=gpu": "needs a GPU (make gpu-check runs the GPU commands)",
    "make tensorboard": "a server that runs until Ctrl-C",
    "make test": "the suite this test belongs to",
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu": "installs into the reader's own environment, which make install replaces here",
    'pip install -e ".[export]"': "the same: an editable install from a scratch copy would repoint .venv at it",
    "python train.py preset=smoke": "`make train` above runs this very command (train.py preset=smoke, smoke-sized "
                                    "as every training command here)",
}
# Appended to a command that trains, so that it runs in seconds on the tiny data (values it sets win). Batches
# of 32, to train and to evaluate: two batches of the default 256 (and one of 1000 to evaluate) cost each training
# process seconds of convolutions, and the suite's time is mostly CPU.
SMOKE = "preset=smoke data.val_size=100 data.batch_size=32 data.eval_batch_size=32"
# What a command needs from the checkout: entry points, configs, scripts, the Makefile and .venv.
NEEDED = ["train.py", "tune.py", "evaluate.py", "predict.py", "export.py", "conf", "scripts", "Makefile",
          "pyproject.toml", "constraints"]


def readme_commands() -> list[str]:
    """Each command line of the README's ```bash blocks, in order, without its trailing comment."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def as_run(command: str) -> str:
    """The command as this test runs it: smoke-sized where it trains."""
    if command.startswith("python train.py") and "--help" not in command:
        return f"{command} {SMOKE}"
    if command == "make train":
        return f'make train ARGS="{SMOKE}"'
    return command


@pytest.fixture
def scratch(tmp_path) -> Path:
    # The README's `make install` must find .venv up to date: otherwise it would reinstall into the real
    # .venv from this scratch copy. `make test` brings it up to date first.
    if subprocess.run(["make", "-q", ".venv/.installed-stamp"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("the README's set-up is `make install`: run this test through `make test`, which builds .venv")
    for name in NEEDED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, copy_function=shutil.copy2)
        else:
            shutil.copy2(source, tmp_path / name)  # mtimes kept: make sees .venv as up to date
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "data").mkdir()
    # Enough rows for every subset the README asks for (data.train_subset=2000 after 100 for validation).
    write_csv(tmp_path / "data" / "fashion-mnist_train.csv", *make_images(2200, 0))
    write_csv(tmp_path / "data" / "fashion-mnist_test.csv", *make_images(200, 1))
    return tmp_path


def check_run_output(result: subprocess.CompletedProcess, cwd: Path) -> None:
    """A training run's console output, as the README describes it: each line printed once, no notices a
    user cannot act on, a line per epoch (no progress bar in a pipe), and a result block at the end that
    names the run's directory (`cwd`: where the command ran)."""
    messages = [line.split("] ", 1)[-1] for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(messages) == len(set(messages)), "a line printed twice"
    assert not any("litlogger" in m or "LeafSpec" in m or "logging interval" in m for m in messages)
    assert any(m.startswith("epoch 1/1: train loss") for m in messages)
    block = result.stdout.rstrip().splitlines()[-5:]
    run = block[0].split("run completed: ", 1)[-1]
    assert "run completed: " in block[0] and "best val acc" in block[1] and "test acc" in block[2], block
    # A command to paste: quoted where the shell needs it (a long run name ends in `~` and a hash, say).
    assert block[-1].strip() == f"TensorBoard   tensorboard --logdir {shlex.quote(run)}"
    assert (read_record(cwd / run) or {}).get("status") == "completed", run  # the directory it names is the run's
    # Epochs count from 1 everywhere: the checkpoint of the first epoch is epoch 1.
    assert (cwd / run / "checkpoints" / "best-epoch001.ckpt").exists()


def test_every_readme_command_is_run_or_exempt_with_a_reason():
    commands = readme_commands()
    assert "make train" in commands and "make test" in commands
    stale = [c for c in EXEMPT if c not in commands]
    assert not stale, f"exempt commands the README no longer has: {stale}"


def test_the_readme_commands_run_as_written(scratch):
    ran = []
    for command in readme_commands():
        if command in EXEMPT:
            continue
        line = as_run(command)
        result = subprocess.run(["bash", "-c", f"source .venv/bin/activate && {line}"], cwd=scratch,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README command failed: {line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        if command.startswith("python train.py") and not any(c.startswith("python train.py") for c in ran):
            check_run_output(result, scratch)  # the first run a newcomer starts
        ran.append(command)
    assert any(c.startswith("python train.py") for c in ran) and any(c.startswith("python predict.py") for c in ran)
    assert list((scratch / "outputs" / "runs").glob("*/metrics.json")), "no run written under outputs/runs"
