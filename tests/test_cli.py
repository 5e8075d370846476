"""`python train.py ...` as a user runs it, in this process (tests/test_readme.py starts the README's runs)."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from fmnist.data.csv_io import write_csv
from fmnist.runs import read_record
from tests.conftest import FAST, FAST_NAMED, ROOT, make_images, snapshot


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=0", "config key data.batch_size must be at least 1; got 0"),
    ("model.dropout=1.5", "config key model.dropout must be in [0, 1); got 1.5"),
    ("data.val_size=100000", "config key data.val_size must be between 1 and 599"),
    ("trainer.precision=16x", "config key trainer.precision must be one of"),
    ("trainer.accumulate_grad_batches=0", "config key trainer.accumulate_grad_batches must be at least 1; got 0"),
])
def test_nonsense_values_exit_2_with_one_paragraph_printed_once(tmp_path, data_dir, run_in_process, override, message):
    result = run_in_process("train.py", *FAST, f"data.dir={data_dir}", override, f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert (result.stdout + result.stderr).count(message) == 1  # Hydra's log handler writes to stdout: it counts too


HEADER = "label," + ",".join(f"pixel{i}" for i in range(1, 785))
ROW = "3," + ",".join(["0"] * 784)


@pytest.mark.parametrize("train_text,message", [
    (HEADER + "\n" + ROW[:-1] + "x\n", "fashion-mnist_train.csv, line 2, column 785 (pixel784): expected an integer 0-255, found 'x'"),
    ("", "fashion-mnist_train.csv: the file is empty"),
    (HEADER + "\n", "fashion-mnist_train.csv: has a header but no data rows"),
    (HEADER.replace("pixel9,", "pixel9x,") + "\n" + ROW + "\n", "fashion-mnist_train.csv, line 1: expected a header with 785 columns"),
    (HEADER + "\n" + ROW + "\n" + "12" + ROW[1:] + "\n", "line 3, column 1 (label): expected a label in 0-9, found '12'"),
    (HEADER + "\n" + ROW + "\n" + ROW[:500] + "\n", "line 3: expected 785 values (label and 784 pixels), found 251 (the file may be truncated)"),
])
def test_bad_csv_exits_2_naming_the_problem(tmp_path, run_in_process, train_text, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "fashion-mnist_train.csv").write_text(train_text)
    (data / "fashion-mnist_test.csv").write_text(HEADER + "\n" + ROW + "\n")
    result = run_in_process("train.py", *FAST, f"data.dir={data}", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_a_sweep_with_a_bad_value_in_a_later_job_is_refused_before_any_job(tmp_path, data_dir, run_in_process):
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "model=simple", "seed=0,1,-1",
                            "model.dropout=0.1,0.5", f"hydra.sweep.dir={tmp_path}/sweep")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: the sweep's job seed=-1 model.dropout=0.5: config key seed must be in [0, 4294967295]; got -1. " \
           "No job of the sweep was started." in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_whose_values_break_a_rule_only_in_combination_is_refused_before_any_job(tmp_path, data_dir,
                                                                                           run_in_process):
    # Each value is fine alone; alternating flips without flips is not, in the job that has both.
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "model=simple,optimized",
                            "data.augment.hflip=true,false", "data.augment.flip_alternate=true,false",
                            f"hydra.sweep.dir={tmp_path}/sweep")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: the sweep's job model=simple data.augment.hflip=false data.augment.flip_alternate=true: config key " \
           "data.augment.flip_alternate must be false unless data.augment.hflip is true" in result.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("swept,shown", [("experiment=speedrun_cpu,cpu_best", "experiment (speedrun_cpu, cpu_best)"),
                                          ("trainer.devices=1,2", "trainer.devices (1, 2)")])
def test_a_sweep_over_a_key_that_names_no_job_is_refused_before_any_job(tmp_path, data_dir, run_in_process, swept,
                                                                        shown):
    # Its jobs would share one directory: the second refused (another experiment) or skipped (finished).
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", swept, f"hydra.sweep.dir={tmp_path}/s")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: the sweep varies {shown}, which is not part of a job's name" in result.stderr
    assert not (tmp_path / "s").exists()


def test_a_parallel_sweep_of_no_job_at_once_is_refused_before_its_directory(tmp_path, data_dir, run_in_process):
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "seed=0,1", "hydra/launcher=joblib",
                            "hydra.launcher.n_jobs=0", f"hydra.sweep.dir={tmp_path}/s")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "hydra.launcher.n_jobs=0 runs no job" in result.stderr and not (tmp_path / "s").exists()


@pytest.mark.parametrize("script,args,words", [
    ("train.py", [*FAST, "optim.lr=${oc.env:FMNIST_UNSET}"], "config key optim.lr: its value cannot be resolved: "
                                                             "\"Environment variable 'FMNIST_UNSET' not found\""),
    ("train.py", [*FAST, "~model"], "config key model has no value (~model removed it?)"),
    ("train.py", ["-m", *FAST, "~seed"], "the sweep: config key seed has no value (~seed removed it?)"),
    # in a sweep: found by the sweep's own checks, before Hydra rewrites an earlier sweep's multirun.yaml
    ("train.py", ["-m", *FAST, "optim.lr=${oc.env:FMNIST_UNSET}", "seed=0,1"],
     "the sweep's job seed=0: config key optim.lr: its value cannot be resolved"),
    ("evaluate.py", ["ckpt=${oc.env:FMNIST_UNSET}"], "config key ckpt: its value cannot be resolved"),
    ("evaluate.py", [], "config key ckpt is required"),  # not given at all: nothing was removed with ~
])
def test_a_value_that_cannot_be_resolved_or_a_removed_key_is_named(tmp_path, data_dir, run_in_process, monkeypatch,
                                                                   script, args, words):
    monkeypatch.delenv("FMNIST_UNSET", raising=False)
    result = run_in_process(script, *args, f"data.dir={data_dir}", f"hydra.{'sweep' if '-m' in args else 'run'}.dir="
                            f"{tmp_path}/out")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1].startswith(f"error: {words}") and "Error executing job" not in result.stderr
    assert "raised InterpolationResolutionError" not in result.stderr  # Hydra's warning of a callback that failed
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script,args", [("evaluate.py", ["+foo=1"]), ("predict.py", ["inputs=a.png", "+tta=flip"]),
                                         ("export.py", ["+foo=1"]), ("evaluate.py", ["+data.foo.bar=1"])])
def test_an_added_key_that_nothing_reads_is_refused_by_every_command(tmp_path, run_in_process, script, args):
    # predict.py has no tta key: `+tta=flip` would have predicted without it, as if it had been applied
    result = run_in_process(script, "ckpt=x.ckpt", *args, cwd=tmp_path)
    assert result.returncode == 2 and "does not exist, so nothing would read it" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script,args,named", [
    ("train.py", ["experiment=null"], "experiment=null"), ("train.py", ["hydra/launcher=NULL"], "hydra/launcher=NULL"),
    ("evaluate.py", ["ckpt=x.ckpt", "tune=null"], "tune=null"),
    ("tune.py", ["study=s", "space.model.choices=[null]"], "model=null"),  # a search space's choice
    ("train.py", ["-m", "model=simple,null"], "model=null"),  # among a sweep's values: named by job, before any
])
def test_a_config_group_given_null_is_one_paragraph_naming_it(tmp_path, data_dir, run_in_process, script, args, named):
    # `experiment=null` reads as "no experiment"; Hydra's own refusal is a ValueError naming neither the group nor
    # what to type instead.
    where = f"out_dir={tmp_path}" if script == "tune.py" else f"hydra.{'sweep' if '-m' in args else 'run'}.dir={tmp_path / 'run'}"
    result = run_in_process(script, *args, f"data.dir={data_dir}", where, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"`{named}`: a config group takes the name of one of its options, and null names none" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script,flag", [("evaluate.py", "-m"), ("predict.py", "--multirun"), ("export.py", "-m"),
                                         ("evaluate.py", "--multi")])  # Hydra's parser takes an abbreviation
def test_a_command_that_runs_once_refuses_dash_m_and_writes_no_sweep_file(tmp_path, run_in_process, script, flag):
    # Hydra would write ./multirun/DATE/TIME/multirun.yaml whether the jobs were refused or not.
    result = run_in_process(script, flag, "ckpt=a.ckpt,b.ckpt", cwd=tmp_path)
    assert result.returncode == 2 and f"{script} runs once: -m (a sweep) is for train.py" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script,arg,key", [("evaluate.py", "model=simple", "model"),
                                             ("evaluate.py", "+model=simple", "model"),
                                             ("predict.py", "optim.lr=0.01", "optim.lr"),
                                             ("export.py", "experiment=best", "experiment"),
                                             ("evaluate.py", "seed=1", "seed")])
def test_a_command_that_loads_a_model_says_a_training_key_is_set_when_training(tmp_path, run_in_process, script,
                                                                               arg, key):
    # Hydra's own refusal of `model=simple` advised `+model=simple`, which failed differently.
    result = run_in_process(script, "ckpt=a.ckpt", arg, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{script} takes no `{key}`: it is set when training (python train.py {arg.lstrip('+')})" in result.stderr
    assert "+model" not in result.stderr and list(tmp_path.iterdir()) == []
    # a key that training does not take either, one another of these commands takes (predict.py has no data.dir:
    # its images are inputs=), or another command's group keeps Hydra's account
    for other, words in (("nosuch=1", "Key 'nosuch' not in"), ("data.dir=x", "Key 'data' not in"),
                         ("tune=x", "Could not override 'tune'")):
        result = run_in_process(script, "ckpt=a.ckpt", other, cwd=tmp_path)
        assert result.returncode == 2 and "set when training" not in result.stderr, result.stderr
        assert words in result.stderr or (other == "data.dir=x" and script != "predict.py"), result.stderr


def test_an_unparseable_override_naming_an_existing_path_is_quoted_for_hydra(tmp_path):
    from fmnist.overrides import quoted_paths

    job = tmp_path / "optim.lr=0.01,seed=1"
    job.mkdir()
    assert quoted_paths([f"ckpt={job}", "optim.lr=1e-2,1e-3", f"+data.dir={tmp_path}/no=such", "-m"]) == [
        f"ckpt='{job}'", "optim.lr=1e-2,1e-3", f"+data.dir={tmp_path}/no=such", "-m"]  # a sweep, a typo: as given


def test_an_overrides_key_is_read_one_way_for_every_command():
    from fmnist.overrides import override_key

    assert [override_key(o) for o in ("optim.lr=0.01", "+optim.lr=0.01", "++seed=1", "~model", "model@net=resnet",
                                      "+experiment@_global_=study", "ckpt=a=b")] == \
        ["optim.lr", "optim.lr", "seed", "model", "model", "experiment", "ckpt"]


@pytest.mark.parametrize("where", [[], ["hydra.run.dir=outputs/mistyped"]])
def test_resuming_where_there_is_no_run_is_refused_instead_of_starting_a_new_one(tmp_path, data_dir, run_in_process,
                                                                                 where):
    # Without hydra.run.dir the run's directory is a new one (time and process id): nothing there to resume.
    result = run_in_process("train.py", *FAST, f"data.dir={data_dir}", "ckpt_path=last", *where, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.search(r"error: ckpt_path=last continues a stopped run in its own directory, and \S*outputs/\S+ holds "
                     r"none .* Add hydra.run.dir=DIR naming the stopped run's directory", result.stderr.splitlines()[-1])
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_into_a_directory_of_ones_own_files_is_refused(tmp_path, data_dir, run_in_process):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "summary.md").write_text("my notes")
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "seed=0", f"hydra.sweep.dir={tmp_path}/mine")
    assert result.returncode == 2
    assert f"{tmp_path}/mine holds files that no sweep wrote (summary.md; no multirun.yaml)" in result.stderr
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["summary.md"]
    assert (tmp_path / "mine" / "summary.md").read_text() == "my notes"


@pytest.mark.slow
def test_a_sweep_continued_on_other_data_is_refused_before_a_job_trains(tmp_path, data_dir, run_in_process):
    sweep = tmp_path / "sweep"
    first = run_in_process("train.py", "-m", *FAST, "model=simple", f"data.dir={data_dir}", "seed=0", f"hydra.sweep.dir={sweep}")
    assert first.returncode == 0, first.stderr[-2000:]
    other = shutil.copytree(data_dir, tmp_path / "other")
    write_csv(other / "fashion-mnist_train.csv", *make_images(600, 5))
    before = snapshot(sweep)
    result = run_in_process("train.py", "-m", *FAST, "model=simple", f"data.dir={other}", "seed=1", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 2 and re.search(r"its completed job \S*seed=0 ran on other data", result.stderr), result.stderr
    assert "No job of the sweep was started" in result.stderr and snapshot(sweep) == before
    moved = shutil.copytree(data_dir, tmp_path / "moved")  # the same files elsewhere: the sweep goes on
    again = run_in_process("train.py", "-m", *FAST, "model=simple", f"data.dir={moved}", "seed=1", f"hydra.sweep.dir={sweep}")
    assert again.returncode == 0 and "Jobs: 2 completed." in (sweep / "summary.md").read_text(), again.stderr[-2000:]


@pytest.mark.slow
def test_a_later_jobs_refusal_keeps_the_sweep_file_of_the_jobs_that_ran(tmp_path, data_dir, run_in_process):
    # The second job's directory holds a file no run wrote: refused when that job starts, after the first one trained.
    second = tmp_path / "sweep" / f"seed=1,{FAST_NAMED},model=simple"
    second.mkdir(parents=True)
    (second / "notes.txt").write_text("mine")
    (tmp_path / "sweep" / "multirun.yaml").write_text("an earlier sweep's\n")  # a sweep's directory, continued
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "model=simple", "seed=0,1",
                            f"hydra.sweep.dir={tmp_path}/sweep")
    assert result.returncode == 2 and f"{second} holds files that no run wrote (notes.txt)" in result.stderr
    assert "seed=0,1" in (tmp_path / "sweep" / "multirun.yaml").read_text()  # this sweep's: its first job ran
    assert [read_record(p)["status"] for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p != second] == ["completed"]


@pytest.mark.slow
def test_multirun_writes_one_directory_per_job_and_a_summary(tmp_path, data_dir, run_in_process):
    # In this process: the README test runs the same kind of sweep as a user does, in a new one.
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "model=simple", "optim.lr=1e-2,1e-4",
                     f"hydra.sweep.dir={tmp_path}/sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert {p.name for p in sweep.iterdir() if p.is_dir()} == {  # the key that differs first, as TensorBoard shows them
        f"optim.lr=0.01,{FAST_NAMED},model=simple", f"optim.lr=0.0001,{FAST_NAMED},model=simple"}
    table = pd.read_csv(sweep / "summary.csv")
    assert len(table) == 2 and set(table.status) == {"completed"} and table.test_acc.between(0, 1).all()
    assert "optim.lr=0.01" in (sweep / "summary.md").read_text()
    # The sweep's own lines are timed as a run's are ([hh:mm:ss] message), not in Hydra's longer format.
    assert re.search(r"^\[\d\d:\d\d:\d\d\] sweep summary: ", result.stdout, re.M), result.stdout[-2000:]
    assert "[HYDRA]" not in result.stdout + result.stderr


def test_help_lists_the_groups_train_takes_and_only_those(run_in_process):
    result = run_in_process("train.py", "--help")
    assert result.returncode == 0 and "python train.py -m key=a,b" in result.stdout
    assert "model: optimized, resnet, simple" in result.stdout and "schema" not in result.stdout
    groups = [line.split(":")[0] for line in result.stdout.splitlines() if re.match(r"\w+: \w", line)]
    assert "experiment" in groups and "preset" in groups and "tune" not in groups  # tune=: tune.py's search spaces


def test_an_experiments_seeds_without_dash_m_are_not_dropped_silently(tmp_path, data_dir, run_in_process):
    # A refused value keeps the test short; the warning comes before any check.
    result = run_in_process("train.py", "experiment=speedrun_cpu", f"data.dir={data_dir}", "data.batch_size=0", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2
    assert "this config defines a sweep (seed: 0,1,2) that runs only with -m" in result.stdout + result.stderr


def test_a_sweep_name_that_is_a_path_exits_2_and_writes_nothing(tmp_path, run_in_process, recwarn):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    result = run_in_process("train.py", "-m", "name=../../escaped", "seed=0,1", cwd=work)
    assert result.returncode == 2 and "config key name must be a name, not a path" in result.stderr
    assert "Traceback" not in result.stderr and not [w for w in recwarn if "CheckSweep" in str(w.message)]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b"]


def test_cfg_with_a_sweep_says_to_drop_dash_m(run_in_process):
    result = run_in_process("train.py", "-m", "seed=0,1", "--cfg", "job")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --cfg shows one job's config and -m runs a sweep" in result.stderr


@pytest.mark.parametrize("cfg", [["--cfg", "hydra"], ["--cfg=hydra"]])
def test_cfg_hydra_resolved_says_what_prints_hydras_keys_resolved(run_in_process, cfg):
    result = run_in_process("train.py", *cfg, "--resolve")  # Hydra drops the job's `name` that sweep.dir names
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "`--cfg all --resolve` prints them resolved" in result.stderr and result.stderr.count("error:") == 1
    shown = run_in_process("train.py", "--cfg", "all", "--resolve", "-p", "hydra.sweep.dir")  # what it points to
    assert shown.returncode == 0 and shown.stdout.strip().startswith("outputs/train/"), shown.stderr[-2000:]


def test_overrides_on_both_sides_of_a_hydra_option_are_all_taken(run_in_process):
    # Hydra's parser takes overrides only after its options: `python train.py model=optimized -m optim.lr=1e-2,1e-4`
    # was refused as `unrecognized arguments: optim.lr=1e-2,1e-4`.
    from fmnist.cli import overrides_last

    assert overrides_last(["model=simple", "-m", "seed=0,1"]) == ["-m", "model=simple", "seed=0,1"]
    assert overrides_last(["a=1", "--cfg", "job", "-p", "seed", "b=2"]) == ["--cfg", "job", "-p", "seed", "a=1", "b=2"]
    result = run_in_process("train.py", "model=simple", "--cfg", "job", "optim.lr=0.5", "-p", "optim.lr")
    assert result.returncode == 0 and result.stdout.strip() == "0.5", result.stderr[-2000:]


def test_two_hydra_modes_on_one_command_line_are_one_paragraph(run_in_process):
    result = run_in_process("train.py", "-m", "seed=0,1", "--info")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: --info and --multirun each tell Hydra what to do" in result.stderr


def test_old_key_names_still_work_with_a_note(run_in_process):
    result = run_in_process("train.py", "model.tta=flip", "model.compile=true", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: model.tta is now tta; `model.tta=flip` runs as `tta=flip`." in result.stderr
    assert "\ntta: flip\n" in result.stdout and "\ncompile: true\n" in result.stdout and "  tta:" not in result.stdout


def test_a_superseded_experiment_still_runs_and_names_its_replacement(tmp_path, data_dir, run_in_process):
    # A refused value keeps the test short; the note comes before any check.
    result = run_in_process("train.py", "-m", "experiment=ablation_lr", f"data.dir={data_dir}", "data.batch_size=0",
                            f"hydra.sweep.dir={tmp_path}/s")
    assert result.returncode == 2 and "config key data.batch_size must be at least 1" in result.stderr
    assert "note: experiment=ablation_lr still runs, but the report's ablations are one sweep now: experiment=report" \
        in result.stderr


# `make` as a user types it in a shell: without the variables of a `make test ARGS=...` this suite may run under,
# which make puts into the environment (ARGS, DATA, ...) and MAKEFLAGS.
OUTSIDE_MAKE = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}


@pytest.mark.parametrize("path", ["my data,v2=new", "it's here", 'say "cheese"', "x$y", "p`q`"])
def test_make_passes_a_data_path_with_spaces_and_commas_whole(path):
    # `make train DATA=...`: one argument for get_data.py and one value for Hydra (not split, not a sweep); a `$` or
    # a backquote expanded by make or the shell would write the CSVs into another directory, or run a command.
    lines = subprocess.run(["make", "-n", "train", f"DATA={path}"], cwd=ROOT, capture_output=True, text=True,
                           check=True, env=OUTSIDE_MAKE).stdout.splitlines()
    get_data = shlex.split(next(line for line in lines if "get_data.py" in line))
    assert get_data[-2:] == ["--data-dir", path]
    train = shlex.split(next(line for line in lines if "train.py" in line))
    (override,) = OverridesParser.create().parse_overrides([arg for arg in train if arg.startswith("data.dir=")])
    assert override.key_or_group == "data.dir" and override.value() == path
    # A plain path stays plain: it is what a run's overrides and its resume command show.
    plain = subprocess.run(["make", "-n", "train"], cwd=ROOT, capture_output=True, text=True, check=True,
                           env=OUTSIDE_MAKE).stdout
    assert "data.dir=data" in shlex.split(next(line for line in plain.splitlines() if "train.py" in line))


def test_make_passes_args_on_to_data_and_report_and_refuses_an_empty_python():
    def planned(*args: str) -> list[list[str]]:
        result = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                                env=OUTSIDE_MAKE)
        return [shlex.split(line) for line in result.stdout.splitlines() if ".venv/bin/python" in line]

    # They were dropped: `--no-download` ignored, another sweep's report not drawn.
    assert planned("data", "ARGS=--no-download")[-1][-1] == "--no-download"
    assert planned("train", "ARGS=preset=smoke")[-2][-2:] == ["--data-dir", "data"]  # train's ARGS are train.py's alone
    assert planned("report", "ARGS=outputs/mine")[-1][-2:] == ["report", "outputs/mine"]
    assert planned("report", "SWEEP=outputs/a b")[-1][-2:] == ["report", "outputs/a b"]
    assert planned("report")[-1][-2:] == ["report", "outputs/study-cpu"]
    # An empty PYTHON made the recipe line `-m venv .venv`, whose failure make ignores, and went on.
    for goal in ("install", "lock"):  # -B: planned as on a fresh clone, whatever .venv holds here
        result = subprocess.run(["make", "-n", "-B", goal, "PYTHON="], cwd=ROOT, capture_output=True, text=True,
                                env=OUTSIDE_MAKE)
        assert result.returncode == 2 and "PYTHON is empty (an unset shell variable?)" in result.stderr
        assert "venv" not in result.stdout  # no recipe line planned (under `make test`, make[1]'s directory lines only)
    # Goals that run no Python still work (`PYTHON= make clean` from a shell whose variable is unset).
    result = subprocess.run(["make", "-n", "clean", "PYTHON="], cwd=ROOT, capture_output=True, text=True,
                            env=OUTSIDE_MAKE)
    assert result.returncode == 0 and "rm -rf .venv" in result.stdout, result.stderr


def test_a_console_whose_reader_has_gone_goes_quiet_instead_of_a_traceback_per_line(capfd):
    """`python train.py ... | head -1`: the run goes on; its console lines after the first go nowhere."""
    import logging
    import os

    from fmnist.console import ConsoleHandler

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`head`) has exited
    stream = os.fdopen(write_end, "w")
    handler = ConsoleHandler(stream)
    record = logging.LogRecord("fmnist", logging.INFO, __file__, 1, "epoch %d", (1,), None)
    for _ in range(3):
        handler.emit(record)
    print("after the pipe closed", file=stream, flush=True)  # a print too (the run's closing block)
    stream.close()
    assert "Logging error" not in capfd.readouterr().err


def test_a_log_file_that_cannot_be_written_says_so_once_instead_of_a_traceback_per_line(tmpfs, capfd):
    """A sweep onto a full disk: each job's train.log fails at every line, ahead of the command's own paragraph."""
    import logging

    from fmnist.console import LogFileHandler

    disk = tmpfs("size=4k")
    (disk / "filler").write_bytes(b"x" * 4096)  # the disk is full before the log's first line
    handler = LogFileHandler(disk / "train.log", delay=True)
    record = logging.LogRecord("fmnist", logging.INFO, __file__, 1, "epoch %d " + "x" * 5000, (1,), None)
    for _ in range(3):
        handler.emit(record)
    handler.close()
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err, err
    assert err.count(f"warning: cannot write the log file {disk / 'train.log'} (No space left on device)") == 1, err


@pytest.mark.parametrize("script,args", [("scripts/benchmark.py", ["--out", "-"]),
                                         ("scripts/gpu_check.py", ["--dry-run", "--results", "-"]),
                                         ("scripts/gpu_check.py", ["--dry-run", "--archive", "-"])])
def test_an_output_named_dash_is_refused_not_written_as_a_file_of_that_name(tmp_path, run_in_process, script, args):
    result = run_in_process(script, *args, cwd=tmp_path)
    assert result.returncode == 2 and "`-` (standard output) is not written to here" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_log_line_naming_a_path_that_is_not_utf8_is_written_as_its_bytes(tmp_path, capfd):
    import logging

    from fmnist.console import LogFileHandler

    handler = LogFileHandler(tmp_path / "train.log", delay=True)
    path = os.fsdecode(b"/runs/bad\xff")  # as Python reads such a directory name: with a surrogate escape
    handler.emit(logging.LogRecord("fmnist", logging.INFO, __file__, 1, "run completed: %s", (path,), None))
    handler.close()
    assert "Logging error" not in capfd.readouterr().err
    assert (tmp_path / "train.log").read_bytes() == b"run completed: /runs/bad\xff\n"


def test_a_job_refused_in_a_submitit_worker_is_its_own_paragraph_not_submitits_traceback():
    from fmnist.cli import worker_refusal

    class UncompletedJobError(RuntimeError):  # submitit's, as the sweep process receives it
        pass

    stderr = ("Job 16204 (task: 0) with path /s/.submitit/16204/16204_0_result.pkl\nhas not produced any output "
              "(state: FINISHED)\nError stream produced:\n----------------------------------------\n"
              "error: /s/seed=0 is in use by process 16194, which is running in it now; nothing was written.\n")
    assert worker_refusal(UncompletedJobError(stderr)) == (
        "/s/seed=0 is in use by process 16194, which is running in it now; nothing was written.")
    assert worker_refusal(UncompletedJobError("has not produced any output (state: FAILED)")) is None  # a crash
    assert worker_refusal(RuntimeError("error: not from a worker")) is None


def test_a_hang_up_stops_a_command_as_sigterm_does_unless_it_is_ignored():
    """The terminal closed, an ssh session dropped: a run is recorded `interrupted`, as for SIGTERM."""
    import os
    import signal

    from fmnist.stops import hangup_as_sigterm

    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # `nohup`: stays ignored
        hangup_as_sigterm()
        os.kill(os.getpid(), signal.SIGHUP)
        assert received == []
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        hangup_as_sigterm()
        os.kill(os.getpid(), signal.SIGHUP)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, previous)


def test_a_plain_command_whose_reader_has_gone_finishes_its_work_without_a_traceback(tmp_path):
    # `python -m fmnist.results summary A B | head -1`: the reader goes after the first line, the command still
    # writes the second directory's files, and exits 0 rather than with a BrokenPipeError.
    from fmnist.cli import run_plain

    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line
    stdout = sys.stdout
    sys.stdout = open(write, "w", buffering=1)
    written = tmp_path / "second.txt"

    def work():
        print("first line")
        print("x" * 100_000)
        written.write_text("done")

    try:
        code = run_plain(work)
    finally:
        broken, sys.stdout = sys.stdout, stdout
    assert code == 0 and written.read_text() == "done"
    assert broken.closed is False  # still ours to close: run_plain put back the stream it was given
    broken.close()
    # Started with its output closed (`>&-`: Python's sys.stdout is None): print does nothing, as without run_plain.
    written.unlink()
    sys.stdout = None
    try:
        code = run_plain(work)
    finally:
        sys.stdout = stdout
    assert code == 0 and written.read_text() == "done"


def test_a_sweep_that_stops_collecting_at_a_refused_job_says_how_to_collect_the_others(monkeypatch, capsys):
    from fmnist.cli import run_cli

    class UncompletedJobError(RuntimeError):  # submitit's, as Hydra's submitit launcher raises it from a job's result
        pass

    def sweep():
        raise UncompletedJobError("Error stream produced:\nerror: /s/seed=1 is in use by process 16194, which is "
                                  "running in it now; nothing was written.\n")

    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "seed=0,1,2", "hydra/launcher=submitit_local"])
    with pytest.raises(SystemExit) as ended:
        run_cli(sweep)
    assert ended.value.code == 3  # some job did not complete: not a refused sweep (2)
    err = capsys.readouterr().err
    assert err.startswith("error: a job of the sweep was refused in its worker process: /s/seed=1 is in use")
    assert "the jobs already started run on" in err and "run the same sweep command again" in err


@pytest.mark.parametrize("entry_point", ["train.py", "tune.py"])
def test_a_command_collects_its_garbage_once_at_exit_and_leaves_the_rest_to_the_teardown(tmp_path, entry_point):
    # The interpreter's teardown need not walk every object the command left alive again and again: they are frozen
    # (fmnist.cli.skip_the_final_collections). Garbage that holds a resource is still collected, its finalizer run.
    flushed = tmp_path / "flushed"
    script = f"""
import atexit, gc, runpy, sys
class Flushes:  # in a reference cycle: only a collection frees it and runs its finalizer
    def __init__(self): self.me = self
    def __del__(self): open({str(flushed)!r}, "w").close()
sys.argv = [{entry_point!r}, "--help"]
try:
    runpy.run_path({entry_point!r}, run_name="__main__")
except SystemExit:
    pass
Flushes()
atexit._run_exitfuncs()
print(gc.get_freeze_count(), flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 10_000  # every object alive at exit (a bare interpreter freezes none)
    assert flushed.exists()
