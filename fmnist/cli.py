"""What every entry point adds around Hydra or argparse: user errors in the command line exit 2 with one paragraph.

Hydra reports a bad override (`optim.lrr=0.1`, `optim.lr=abc`, `model=nosuch`) by printing it and
exiting 1, the code of a crash; and it accepts `+optim.lrr=0.1` (its own hint), which nothing reads.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import gc
import io
import os
import sys
from pathlib import Path
from typing import Callable

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fmnist import fsio
from fmnist.console import ReaderMayGo
from fmnist.errors import INCOMPLETE_SWEEP_EXIT_CODE, ConfigError, FmnistError, chained_fmnist_error, first_line
from fmnist.fsio import (RUN_DIR_KEY, SWEEP_DIR_KEY, early_writes_undone_if_stopped, note_dirs_to_be_made,
                         storage_error)
from fmnist.overrides import composition_message, null_group_message, override_key, quoted_paths, renamed_overrides
from fmnist.stops import (CTRL_C_EXIT, SIGTERM_EXIT, Terminated, hangup_as_sigterm, sigterm_unwinds,
                          stopped_by_ctrl_c)


class UnknownOptionFirstParser(argparse.ArgumentParser):
    """argparse's parser for a command with a required argument (a directory): an option it does not take is
    named as such (`unrecognized arguments: --bogus`, exit 2). argparse checks the required arguments first, so
    that `summary --bogus` would be refused as if only its DIR were missing. Its subcommands' parsers are of this
    class too."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        required = [action for action in self._actions if action.required]
        for action in required:  # a first reading without them, only to find the options not taken
            action.required = False
        try:
            _, extras = super().parse_known_args(args, argparse.Namespace())
        finally:
            for action in required:
                action.required = True
        unknown = [arg for arg in extras if arg.startswith("-") and arg != "-"]  # `-` is a value (standard input)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_known_args(args, namespace)


def refuse_unknown_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """ConfigError for a `+key=value` / `++key=value` override that adds a key the schema does not declare.

    Group overrides (`+experiment=...`) add no key and pass.
    """
    for override in overrides:
        if not override.startswith("+") or "=" not in override:
            continue
        key = override_key(override)
        if key.startswith("hydra."):
            continue
        parts = key.split(".")
        for depth, name in enumerate(parts):  # the first key along the path that its schema does not declare
            parent_key = ".".join(parts[:depth])
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
            if not dataclasses.is_dataclass(schema) or name not in parent:
                break  # a plain mapping (a model's own keys), or a key `+` did not add
            if name not in {f.name for f in dataclasses.fields(schema)}:
                known = ", ".join(f.name for f in dataclasses.fields(schema))
                raise ConfigError(f"config key {'.'.join(parts[:depth + 1])} does not exist, so nothing would read it "
                                  f"(`+` adds a key, it does not make one meaningful). Keys of "
                                  f"{parent_key or 'the config'}: {known}.")


def check_given_config(cfg: DictConfig, required: bool = False, overrides: list[str] | None = None) -> None:
    """What every Hydra entry point checks before it reads its config: a `+key=value` that adds a key nothing
    reads (`refuse_unknown_keys`), then a value that cannot be resolved (`check_resolvable`). `overrides`: those
    `cfg` was composed with, by default this run's as Hydra has them (a sweep's start check composes its jobs)."""
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        overrides = OmegaConf.to_container(HydraConfig.get().overrides.task)  # as typed, unresolved
    refuse_unknown_keys(cfg, overrides)
    check_resolvable(cfg, required)


def unresolvable(error: OmegaConfBaseException) -> ConfigError:
    """The paragraph for a value OmegaConf could not resolve: the key, and the first line of why."""
    cause = first_line(error).removeprefix("KeyError raised while resolving interpolation: ")
    return ConfigError(f"{f'config key {error.full_key}: its value' if error.full_key else 'a value'} cannot be resolved: "
                       f"{cause}.")


def check_resolvable(cfg: DictConfig, required: bool = False) -> None:
    """ConfigError naming the key whose value cannot be resolved (`${oc.env:LR}` with LR unset, an interpolation of a
    key that is not there), or a key of the schema removed with `~key`; with `required`, also a key left without a
    value (`~model`). Found before the task reads the key, where Hydra would add a line of its own to the error."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise unresolvable(e) from None
    schema = OmegaConf.get_type(cfg)
    fields = dataclasses.fields(schema) if dataclasses.is_dataclass(schema) else ()
    removed = [f.name for f in fields if f.name not in cfg.keys()]  # `in cfg` is false for a `???` key as well
    missing = sorted(OmegaConf.missing_keys(cfg)) if required else []
    if removed or missing:
        key = (removed or missing)[0]
        raise ConfigError(f"config key {key} has no value (~{key} removed it?), and the command reads it: drop ~{key}, "
                          f"or give it one ({key}=...).")


# Hydra's mode flags, by each spelling: a command line with two modes is a ValueError with a traceback there.
HYDRA_MODES = {"-r": "--run", "-m": "--multirun", "-c": "--cfg", "-i": "--info", "-sc": "--shell-completion"}
HYDRA_MODES.update({mode: mode for mode in list(HYDRA_MODES.values())})


def _read_by_hydra(args: list[str], intermixed: bool = False) -> tuple[argparse.Namespace, list[str]] | None:
    """Hydra's own command-line parser's reading of `args` (its namespace, and what it does not take), or None where
    it refuses them (it says why itself when the command runs). `intermixed`: overrides on both sides of options."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's complaint, printed by Hydra when it runs
            return (parser.parse_known_intermixed_args if intermixed else parser.parse_known_args)(args)
    except (SystemExit, TypeError):
        return None


def overrides_last(args: list[str]) -> list[str]:
    """`args` with the overrides moved after Hydra's options, in their order, as Hydra's parser takes them only
    there: `train.py model=simple -m seed=0,1` would be refused as `unrecognized arguments: seed=0,1`. Unchanged where
    that parser refuses the command line anyway."""
    read = _read_by_hydra(args, intermixed=True)
    if read is None or read[1]:
        return args
    parsed = read[0]
    overrides, options, expected = list(parsed.overrides), [], iter(parsed.overrides)
    wanted = next(expected, None)
    for arg in args:  # an option's value (`--cfg job`) is not an override: matched in order, it is skipped
        if arg == wanted:
            wanted = next(expected, None)
        else:
            options.append(arg)
    return [*options, *overrides] if wanted is None else args


def hydra_modes(args: list[str]) -> list[str]:
    """The Hydra modes a command line asks for, by their long names, sorted, as Hydra's own parser reads them
    (`--cfg=job`, `-mc job`, an abbreviation such as `--multi`); by the exact flags where that parser refuses the
    command line (it would say why itself)."""
    read = _read_by_hydra(args)
    if read is None:
        return sorted({HYDRA_MODES[arg.split("=")[0]] for arg in args if arg.split("=")[0] in HYDRA_MODES})
    parsed = read[0]
    asked = {"--run": parsed.run, "--multirun": parsed.multirun, "--cfg": parsed.cfg is not None,
             "--info": parsed.info is not None, "--shell-completion": parsed.shell_completion}
    return sorted(mode for mode, given in asked.items() if given)


# What a refusal names to choose another directory: for a run, and for a sweep (its jobs' directories included).
OTHER_RUN_DIR, OTHER_SWEEP_DIR = f"{RUN_DIR_KEY}=...", f"name=... or {SWEEP_DIR_KEY}=..."


class OutputDirsUndoneIfRefused(Callback):
    """Hydra callback (`conf/train.yaml`, `conf/evaluate.yaml`): note the directories Hydra is about to make for
    the run or the sweep, so that a refused or stopped command removes those it leaves empty (`early_writes_undone_if_stopped`)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._note(config, RUN_DIR_KEY)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._note(config, SWEEP_DIR_KEY)

    # The directory Hydra is about to write into: an OSError without a file name (a write to a full disk) names it.
    output_dir: Path | None = None

    @staticmethod
    def _note(config: DictConfig, key: str) -> None:
        try:
            directory = OmegaConf.select(config, key, throw_on_missing=True)
            if directory is not None:  # '' is the current directory, which is the user's
                note_dirs_to_be_made(Path(str(directory)))
                OutputDirsUndoneIfRefused.output_dir = Path(str(directory))
        except (OmegaConfBaseException, OSError):
            pass  # a value its resolver refuses, a name too long: Hydra reports it when it makes the directory


def exit_if_no_working_directory() -> None:
    """Exit 2 if the directory the command was started in has been deleted (fmnist.fsio.check_working_directory)."""
    try:
        fsio.check_working_directory()
    except ConfigError as e:
        _exit(str(e), 2)


@functools.cache  # once per process
def skip_the_final_collections() -> None:
    """At exit, collect the garbage once, then freeze what is left for the interpreter's teardown.

    A training command ends with hundreds of thousands of objects alive (torch, Lightning, sympy); as the
    interpreter tears its modules down, its garbage collector walks them all again and again, after the
    command's work is done. The one collection here still frees the garbage of the run (its finalizers run, a
    buffered file it held is flushed). What is frozen is never collected: objects in reference cycles still
    alive at exit are left to the OS without their finalizers, which Python does not promise to run at exit
    either. So a command closes what it writes before it ends, as these do: their files are written whole
    (`atomic_write`) or closed at the end of the fit, the exit handlers of the trackers and of torch run before
    this one (registered after it), and logging's flush after it.
    """
    atexit.register(_collect_once_then_freeze)


def _collect_once_then_freeze() -> None:
    gc.collect()
    gc.freeze()


def run_cli(hydra_main: Callable[[], object], unwind_on_sigterm: bool = False, sweeps: bool = True,
            explain: Callable[[BaseException, list[str], str], str | None] | None = None) -> None:
    """Run a `@hydra.main` function; a bad command line or an unwritable output directory exits 2.

    A FmnistError raised inside the task is printed by the task itself (`exit_with`); anything else
    is a bug and ends with its traceback and exit code 1. `unwind_on_sigterm`: see `sigterm_unwinds`. `sweeps`:
    whether the command takes `-m` (a command that writes one result is refused it: Hydra would write its sweep
    file into `./multirun/`, refused or not, and give each job a directory the command does not write into).
    `explain`: the command's own paragraph for a command line Hydra refused (error, overrides, command), or None
    for Hydra's account.
    """
    skip_the_final_collections()
    exit_if_no_working_directory()
    hangup_as_sigterm()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors here instead of printing them and exiting 1
    # old key names keep working, and a path holding `=` or `,` (a sweep job's directory) needs no quotes
    sys.argv[1:] = overrides_last(quoted_paths(renamed_overrides(sys.argv[1:])))
    modes = hydra_modes(sys.argv[1:])
    if modes == ["--cfg", "--multirun"]:
        _exit("--cfg shows one job's config and -m runs a sweep: Hydra takes one of them. Drop -m to see the first "
              "job's config (give one value of each swept key to see another job's).", 2)
    if "--multirun" in modes and not sweeps:
        entry = Path(sys.argv[0]).name
        _exit(f"{entry} runs once: -m (a sweep) is for train.py. Run {entry} once per value (a shell loop); "
              "ckpt= also takes a sweep's directory, whose best job by validation accuracy it uses.", 2)
    if len(modes) > 1:
        _exit(f"{' and '.join(modes)} each tell Hydra what to do, and it takes one of them: keep the one you mean "
              f"({', '.join(sorted(set(HYDRA_MODES.values())))}).", 2)
    for arg in sys.argv[1:]:
        key, given, value = arg.partition("=")
        if given and key.lstrip("+~") in (RUN_DIR_KEY, SWEEP_DIR_KEY) and not value.strip().strip("'\"").strip():
            _exit(f"{key.lstrip('+~')}= is empty (an unset shell variable?), which would put the output into the "
                  "current directory: name a directory, or leave the key out for the default.", 2)
    OutputDirsUndoneIfRefused.output_dir = None  # this command's, once Hydra is about to make it
    try:
        # refused (exit 2) or stopped before its checks passed: what Hydra wrote is put back, whoever refused it
        with sigterm_unwinds(unwind_on_sigterm), early_writes_undone_if_stopped():
            try:
                hydra_main()
            except (HydraException, OmegaConfBaseException) as e:  # e.g. a swept value composed into a job
                ours = chained_fmnist_error(e)  # e.g. a resolver's check of a value (fmnist.overrides.check_name)
                own = explain and explain(e, sys.argv[1:], Path(sys.argv[0]).name)
                _exit(str(ours) if ours else own or composition_message(e) + _hydra_part_hint(e, sys.argv[1:]),
                      ours.exit_code if ours else 2)
            except OSError as e:  # e.g. Hydra creating the run directory or its log file on a read-only disk
                where = OutputDirsUndoneIfRefused.output_dir
                mapped = storage_error(e, path=where and f"a file in {where}",
                                       key=SWEEP_DIR_KEY if "--multirun" in modes else RUN_DIR_KEY)
                if mapped is None:
                    raise
                _exit(str(mapped), 2)
            except Exception as e:
                null_group = null_group_message(e, sys.argv[1:], Path(sys.argv[0]).name)
                if null_group:
                    _exit(null_group, 2)
                refusal = worker_refusal(e)
                if refusal is None:
                    raise
                # The sweep ran (its other jobs may have finished): a job that did not complete, not a refused sweep.
                # Hydra's submitit launcher collects the jobs' results in order and stops at this one.
                _exit(f"a job of the sweep was refused in its worker process: {refusal} The sweep stopped collecting "
                      "its jobs' results there, and wrote no summary; the jobs already started run on. Once they have "
                      "ended, mend what this names and run the same sweep command again: it skips the finished jobs, "
                      "runs the others and writes the summary.", INCOMPLETE_SWEEP_EXIT_CODE)
    except Terminated:
        _exit(*SIGTERM_EXIT)
    except KeyboardInterrupt:  # before a training run started (a started one exits 130 by itself), or another command
        _exit(*CTRL_C_EXIT)


def worker_refusal(error: BaseException) -> str | None:
    """The paragraph a sweep's job printed when it was refused in a submitit worker (SLURM, `submitit_local`), else
    None. The job exits without a result, so submitit raises UncompletedJobError with the job's stderr inside."""
    if type(error).__name__ != "UncompletedJobError":  # submitit's, matched by name: submitit is an extra
        return None
    printed = [line[len("error: "):] for line in str(error).splitlines() if line.startswith("error: ")]
    return printed[-1] if printed else None


def _hydra_part_hint(error: BaseException, args: list[str]) -> str:
    """What to type instead when `--cfg hydra --resolve` fails on an interpolation: Hydra drops the job's keys
    before it resolves that part, and some of its own keys name them (train.py's hydra.sweep.dir names `name`)."""
    from omegaconf.errors import InterpolationKeyError

    shown_part = {a.split("=", 1)[1] for a in args if a.startswith("--cfg=")} | {
        b for a, b in zip(args, args[1:]) if a in ("--cfg", "-c")}
    if not (isinstance(error, InterpolationKeyError) and "hydra" in shown_part and "--resolve" in args):
        return ""
    return (" `--cfg hydra` leaves out the job's keys, which some of Hydra's own keys name: `--cfg all --resolve` "
            "prints them resolved (`--cfg all --resolve -p hydra.sweep.dir` one of them).")


def run_plain(work: Callable[[], object], unwind_on_sigterm: bool = False) -> int:
    """Run a plain (argparse) command's work: a user error prints one paragraph and gives its exit code.
    `unwind_on_sigterm`: see `sigterm_unwinds`."""
    exit_if_no_working_directory()
    hangup_as_sigterm()
    stdout = sys.stdout
    if stdout is not None:  # None: started with its output closed (`>&-`), where print does nothing
        sys.stdout = ReaderMayGo(stdout)
    try:
        with sigterm_unwinds(unwind_on_sigterm):
            work()
    except FmnistError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (Terminated, KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and not stopped_by_ctrl_c(e):
            raise
        message, code = SIGTERM_EXIT if isinstance(e, Terminated) else CTRL_C_EXIT
        print(f"error: {message}", file=sys.stderr)
        return code
    finally:
        try:
            if sys.stdout is not None:
                sys.stdout.flush()  # here, not at exit, where a reader that has gone would be reported as an error
        except OSError as e:  # not a reader gone (ReaderMayGo takes that): e.g. output to a full disk
            print(f"error: the command's output could not be written: {e}", file=sys.stderr)
        finally:
            sys.stdout = stdout
    return 0


def exit_with(error: FmnistError) -> None:
    """Print a user error once, as one paragraph, and exit with its code (2, or 3 for a divergence).

    Called inside the task: a SystemExit passes through Hydra, which would otherwise add its own
    "Error executing job" line."""
    _exit(str(error), error.exit_code)


def _exit(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
