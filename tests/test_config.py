import shlex

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from fmnist.errors import ConfigError
from fmnist.training.checks import check_config
from tests.conftest import compose_cfg


def test_default_is_the_reports_best_setting():
    cfg = compose_cfg()
    assert cfg.model.name == "optimized" and cfg.model.dropout > 0
    assert cfg.optim.lr <= 1e-3 and cfg.data.batch_size >= 256 and cfg.trainer.accelerator == "auto"
    check_config(cfg)


@pytest.mark.parametrize("override,key", [("optim.lr=abc", "optim.lr"), ("data.batch_size=big", "data.batch_size"),
                                          ("trainer.max_epochs=1.5", "trainer.max_epochs")])
def test_wrong_types_fail_at_composition_naming_the_key(override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose_cfg(override)
    assert key in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize("override", ["optim.lrr=1", "data.bach_size=2", "trainer.max_epoch=3"])
def test_typo_keys_fail(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        compose_cfg(override)
    assert override.split("=")[0].split(".")[-1] in str(info.value) + str(info.value.__cause__)


def test_unknown_model_name_fails():
    with pytest.raises(ConfigCompositionException, match="model"):
        compose_cfg("model=vgg")


@pytest.mark.parametrize("override,key", [
    ("data.batch_size=0", "data.batch_size"), ("model.dropout=1.5", "model.dropout"), ("optim.lr=-1", "optim.lr"),
    ("model.dropout=[1]", "model.dropout"), ("model.hidden=abc", "model.hidden"), ("model.channels=[8,0,8,8]", "model.channels"),
    ("data.val_size=0", "data.val_size"), ("optim.name=rmsprop", "optim.name"), ("optim.scheduler=step", "optim.scheduler"),
    ("data.augment.erase=2", "data.augment.erase"), ("data.augment.cutmix=-0.1", "data.augment.cutmix"),
    ("ckpt_path=best", "ckpt_path"),
    ("data.augment.flip_alternate=true", "data.augment.flip_alternate"),
    ("optim.lr=inf", "optim.lr"), ("model.hidden=0", "model.hidden"),
    # Keys Lightning takes: refused here, not by a traceback from inside the Trainer once the run directory is written.
    ("trainer.devices=0", "trainer.devices"), ("trainer.devices=-5", "trainer.devices"), ("trainer.devices=abc", "trainer.devices"),
    ("trainer.devices=[]", "trainer.devices"), ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("trainer.strategy=foo", "trainer.strategy"), ("trainer.strategy=fsdp", "trainer.strategy"),
    ("trainer.strategy=ddp_spawn", "trainer.strategy"), ("trainer.strategy=ddp_notebook", "trainer.strategy"),
    ("trainer.fast_dev_run=-1", "trainer.fast_dev_run"), ("trainer.fast_dev_run=abc", "trainer.fast_dev_run"),
    ("trainer.deterministic=abc", "trainer.deterministic"), ("logger.backends=[csv,csv]", "logger.backends"), ("trainer.max_time=abc", "trainer.max_time"), ("trainer.max_time=00:00:00:00", "trainer.max_time"),
    ("trainer.limit_train_batches=-1", "trainer.limit_train_batches"),
    ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches"),
    ("trainer.limit_train_batches=abc", "trainer.limit_train_batches"),
    ("trainer.limit_val_batches=0", "trainer.limit_val_batches"), ("trainer.limit_test_batches=0", "trainer.limit_test_batches"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("fast_path=true trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch"),
    ("trainer.check_val_every_n_epoch=21", "trainer.check_val_every_n_epoch"),  # above max_epochs (20)
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ("trainer.gradient_clip_val=inf", "trainer.gradient_clip_val"),  # a clip that never clips: null says so
    ("trainer.num_sanity_val_steps=-2", "trainer.num_sanity_val_steps"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.precision=16-true", "trainer.precision"),  # with the default Adam: NaN at its first steps
])
def test_nonsense_values_are_rejected_with_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key {key} must be"):
        check_config(compose_cfg(*override.split()))


@pytest.mark.parametrize("override", [
    "trainer.devices=auto", "trainer.devices=2", "trainer.devices=-1", "trainer.devices=[0,1]", 'trainer.devices="0,1"',
    "trainer.strategy=ddp", "trainer.max_time=00:00:30:00", "trainer.limit_train_batches=0.25",
    "trainer.limit_val_batches=3", "trainer.gradient_clip_val=0", "trainer.precision=16-true optim=sgd",
    "trainer.accumulate_grad_batches=2", "fast_path=true",
])
def test_what_lightning_accepts_passes_the_checks(override):
    check_config(compose_cfg(*override.split()))


# DDP on one device in all trains in one process, as without it: said in the run's log, not silently done.
def test_ddp_on_one_device_is_noted(monkeypatch):
    from fmnist.training.claim import one_process_ddp_note

    note = one_process_ddp_note(compose_cfg("trainer=ddp", "preset=smoke").trainer)
    assert note and note.startswith("trainer.strategy=ddp with one device (trainer.devices=1) trains in one process")
    assert one_process_ddp_note(compose_cfg("trainer=ddp", "trainer.devices=[0]").trainer)
    assert one_process_ddp_note(compose_cfg("trainer=ddp", 'trainer.devices="0,"').trainer)
    for overrides in (["trainer=ddp", "preset=smoke", "trainer.devices=2"], ["preset=smoke"],
                      ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"]):
        assert one_process_ddp_note(compose_cfg(*overrides).trainer) is None, overrides
    # `trainer=ddp` asks for every GPU: on a machine with one, that is one process too.
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert one_process_ddp_note(compose_cfg("trainer=ddp").trainer)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert one_process_ddp_note(compose_cfg("trainer=ddp").trainer) is None


# A resumed run given another length with a learning-rate schedule is told that the schedule moves under it.
def test_a_schedule_stretched_on_resume_is_noted():
    from fmnist.training.claim import stretched_schedule_note

    cfg = compose_cfg("optim=adamw", "trainer.max_epochs=2")
    note = stretched_schedule_note({"trainer.max_epochs": 1}, cfg)
    assert note and note.startswith("trainer.max_epochs is 2, was 1: the learning-rate schedule (optim.scheduler=cosine")
    assert stretched_schedule_note({"trainer.max_epochs": 2}, cfg) is None  # the same length
    flat = compose_cfg("optim=sgd", "optim.scheduler=none", "optim.warmup_epochs=0", "trainer.max_epochs=2")
    assert stretched_schedule_note({"trainer.max_epochs": 1}, flat) is None  # a constant rate: nothing moves
    warm_up_only = compose_cfg("optim=sgd", "optim.scheduler=none", "optim.warmup_epochs=1", "trainer.max_epochs=4")
    assert stretched_schedule_note({"trainer.max_epochs": 2}, warm_up_only) is None  # its epochs, whatever the length


def test_device_indices_and_more_processes_than_cores_are_refused_on_a_cpu_naming_the_key(monkeypatch):
    from fmnist import hardware
    from fmnist.hardware import check_accelerator

    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    for launcher in ("LOCAL_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(launcher, raising=False)
    for devices in ([0, 1], "0,1", -1):
        with pytest.raises(ConfigError, match="config key trainer.devices must be `auto` or a number of processes"):
            check_accelerator("cpu", devices)
    check_accelerator("cpu", 2)
    check_accelerator("cpu", "2")  # Lightning reads a count given as a string
    # 64 processes on 2 cores started, then stalled for minutes
    with pytest.raises(ConfigError, match=r"trainer.devices=3 starts 3 training processes on the CPU, more than the 2 "):
        check_accelerator("cpu", "3")
    monkeypatch.setenv("SLURM_NTASKS", "3")  # srun started the three, each pinned to its own cores
    check_accelerator("cpu", "3")


@pytest.mark.parametrize("value", ["../../x", "..", ".", "a/b", "/abs", "", "x y"])
def test_a_name_that_is_a_path_is_refused(value):
    from fmnist.overrides import check_name, sweep_name
    from fmnist.errors import ConfigError

    with pytest.raises(ConfigError, match="config key name must be a name, not a path"):
        check_name("name", value)
    with pytest.raises(ConfigError):
        sweep_name(value, "2026-01-01_00-00-00")


def test_a_name_too_long_for_a_file_name_is_refused_before_a_file_is_made():
    from fmnist.errors import ConfigError
    from fmnist.overrides import NAME_MAX_BYTES, check_name

    assert check_name("name", "n" * NAME_MAX_BYTES) == "n" * NAME_MAX_BYTES
    for name in ("n" * 251, "é" * 101):  # bytes count, not characters: 202 in UTF-8
        with pytest.raises(ConfigError, match=rf"config key name is {len(name.encode())} bytes long; .* at most {NAME_MAX_BYTES} bytes"):
            check_name("name", name)


def test_names_that_are_names_pass():
    from fmnist.overrides import check_name, sweep_name

    assert check_name("study", "lr_dropout-v2.1") == "lr_dropout-v2.1"
    assert sweep_name("train", "T") == "train/T" and sweep_name("ablation_lr-cpu", "T") == "ablation_lr-cpu"


def test_an_unquoted_value_holding_equals_is_named_with_how_to_quote_it(monkeypatch):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from fmnist.overrides import composition_message

    monkeypatch.setattr("sys.argv", ["train.py", "model=simple", "data.dir=/tmp/a=b"])
    with pytest.raises(HydraException) as error:
        OverridesParser.create().parse_overrides(["model=simple", "data.dir=/tmp/a=b"])
    message = composition_message(error.value)
    assert message.startswith("cannot read the override `data.dir=/tmp/a=b`") and "data.dir=\"'/tmp/a=b'\"" in message
    assert "`python train.py --cfg job` prints every key" in message
    # A list: each item quoted; quoting the whole would make it one name, brackets and all.
    monkeypatch.setattr("sys.argv", ["predict.py", "inputs=[a.png,x=1.png]"])
    with pytest.raises(HydraException) as error:
        OverridesParser.create().parse_overrides(["inputs=[a.png,x=1.png]"])
    assert "e.g. \"inputs=['a.png','x=1.png']\"" in composition_message(error.value)
    # A quote in the value: the example escapes it, so that the suggestion is read back as the value.
    monkeypatch.setattr("sys.argv", ["train.py", "data.dir=/tmp/it's"])
    with pytest.raises(HydraException) as error:
        OverridesParser.create().parse_overrides(["data.dir=/tmp/it's"])
    example = composition_message(error.value).split("e.g. ", 1)[1].split(". ", 1)[0]
    (suggested,) = OverridesParser.create().parse_overrides(shlex.split(example))
    assert suggested.value() == "/tmp/it's", example


def test_a_single_runs_directory_names_the_keys_set_and_stays_short():
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["model=simple", "optim.lr=0.01", "data.dir=elsewhere"], return_hydra_config=True)
    assert cfg.hydra.run.dir.endswith("_model=simple,optim.lr=0.01")  # data.dir only places the run: left out

    from fmnist.overrides import RUN_LABEL_CHARS, run_label

    assert run_label("") == ""
    long_a, long_b = "optim.lr=0.01," * 20 + "seed=1", "optim.lr=0.01," * 20 + "seed=2"
    assert len(run_label(long_a)) <= RUN_LABEL_CHARS + 1 and run_label(long_a) != run_label(long_b)
