"""Hyperparameter search with Optuna: `python tune.py study=NAME n_trials=N [train overrides...]`.

  python tune.py study=lr_dropout n_trials=30 preset=cpu        # search space: conf/tune/default.yaml
  python tune.py study=lr_dropout n_trials=50 preset=cpu        # continue it to 50 trials (same train overrides)
  python tune.py study=s storage=postgresql://host/db ...       # several processes or machines share it

Tune keys (fmnist/sweeps/tune.py, TuneConfig): study, n_trials, storage, out_dir, sampler.*, pruner.*,
heartbeat.*, space.*, tune=NAME.
Every other argument is a train override (conf/train.yaml) applied to every trial. Results:
outputs/tune/<study>/ (study.db, trial-NNNN/ run directories, best.yaml, summary.md, figures).
"""

import logging
import signal
import sys
from pathlib import Path

from fmnist import console
from fmnist.cli import exit_if_no_working_directory, skip_the_final_collections
from fmnist.errors import ConfigError, FmnistError


def main(args: list[str]) -> int:
    skip_the_final_collections()
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return 0
    options = [a for a in args if a.startswith("-")]
    if options:  # e.g. train.py's `--cfg job`: Hydra would read it as a train override and fail on its grammar
        error = ConfigError(f"tune.py takes no option but --help; got {options[0]}. Its arguments are tune keys and "
                            "train overrides, each key=value (python tune.py --help lists the tune keys).")
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    exit_if_no_working_directory()  # before importing torch, which fails on a deleted one with a misleading message
    logging.basicConfig(level=logging.INFO, format=console.CONSOLE_FORMAT, datefmt=console.CONSOLE_DATEFMT, force=True)
    console.setup()  # one line per message, no third-party notices, as train.py prints
    try:
        return search(args)
    except KeyboardInterrupt:  # while importing, or between trials: a trial's training ends as TrialInterrupted
        print("stopped by Ctrl-C outside a trial's training: the trials that finished are recorded, one it had "
              "started does not count towards n_trials; the same command continues the study.", file=sys.stderr)
        return 128 + signal.SIGINT


def search(args: list[str]) -> int:
    """Run the study; the exit code (0, or the error's)."""
    from fmnist.fsio import storage_errors
    from fmnist.sweeps.tune import TrialInterrupted, run_search  # after `--help`: importing torch takes seconds

    try:
        with storage_errors(key="out_dir"):  # a read-only or full disk: one paragraph, exit 2
            run_search(Path(__file__).resolve().parent / "conf", args)
    except FmnistError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except TrialInterrupted as e:
        print("stopped by a signal: a trial it stopped is recorded `interrupted` and does not count towards "
              "n_trials; the same command continues the study and replaces it.", file=sys.stderr)
        return 128 + e.signal_number
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
