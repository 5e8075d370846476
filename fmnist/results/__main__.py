"""`python -m fmnist.results VERB DIR...`: the tables and figures made from finished (or running) sweeps.

  summary DIR...       rewrite each sweep's summary.csv and summary.md from its jobs' metrics.json
  report DIR           the report's figures into DIR/figures/ (and its summary)
  leaderboard DIR...   published results, then each completed setting of the sweeps (markdown)
  tricks DIR...        raw vs EMA weights under each TTA mode, on each run's validation split
                       (--from-csv FILE: the table a former `tricks --csv FILE` wrote, without evaluating)
  changes BASE DIR...  each setting of the DIRs against the baseline sweep BASE, paired by seed on validation
  images A B           two runs (or one-setting sweeps) paired by seed and by image: McNemar's test per
                       seed, an interval over seeds and images (--split val|test; default val)

A DIR is a sweep directory: one holding job directories (each with metrics.json or .hydra/). A
run directory (but for `tricks` and `images`, which take one setting's runs), or a directory without
jobs, is refused (exit 2) and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fmnist.cli import UnknownOptionFirstParser, run_plain
from fmnist.errors import ConfigError
from fmnist.fsio import (atomic_output, atomic_write, check_output_file, check_writable, not_a_directory,
                         output_path_argument, path_argument, some_names, storage_errors)
from fmnist.overrides import SWEEP_CONFIG_FILE
from fmnist.runs import METRICS_FILE, collect


def _a_sweep(directory: Path) -> bool:
    """Whether `directory` holds what marks a sweep: Hydra's multirun.yaml, or a committed sweep's summaries alone."""
    from fmnist.results.sweep import SUMMARY_FILES

    return any((directory / name).is_file() for name in (SWEEP_CONFIG_FILE, *SUMMARY_FILES))


def sweep_dir(text: str) -> Path:
    """`text` as a sweep directory, or ConfigError saying what it is instead."""
    path = Path(text)
    if not path.is_dir():
        raise ConfigError(f"{path}: {not_a_directory(path)}; expected a sweep directory (job directories with metrics.json), "
                          "as `python train.py -m ...` writes under outputs/ (`make ablations` writes outputs/study-cpu).")
    if (path / METRICS_FILE).is_file():
        holder = f"(here {path.parent})" if _a_sweep(path.parent) else \
            "(such as outputs/train/<time>/ from `python train.py -m ...`; one run is evaluated with evaluate.py ckpt=...)"
        raise ConfigError(f"{path}: a run directory, not a sweep; pass the directory that holds the sweep's jobs "
                          f"{holder}.")
    if collect(path).empty:
        sweeps = [d for d in sorted(path.iterdir()) if d.is_dir() and _a_sweep(d)]  # outputs/train: unnamed sweeps
        inside = f"; it holds sweep directories: pass one of them ({some_names([str(d) for d in sweeps])})" if sweeps \
            else ""
        raise ConfigError(f"{path}: no job directories (none holds metrics.json or .hydra/){inside}; expected a sweep "
                          "directory such as outputs/<name>.")
    return path


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more (a batch size)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of 1 or more")
    return value


def check_given_once(dirs: list) -> None:
    """ConfigError for a directory given twice (under one name or two): its runs would count twice."""
    seen: dict[Path, str] = {}
    for d in map(str, dirs):
        first = seen.get(Path(d).resolve())
        if first is not None:
            same = "is given twice" if first == d else f"and {first} are the same directory"
            raise ConfigError(f"{d} {same}: its runs would be counted twice; nothing was read. Give each directory "
                              "once.")
        seen[Path(d).resolve()] = d


def summary(args) -> None:
    """`summary`: every sweep's summary.csv and summary.md made (all refused or none written), then written."""
    from fmnist.results.sweep import SUMMARY_FILES, summary_files

    csv_name, md_name = SUMMARY_FILES
    prepared = [(directory, *summary_files(directory)) for directory in args.dirs]  # a refusal writes nothing
    for directory, table, files in prepared:
        for path, text in files.items():
            atomic_write(path, text)
        print(files[directory / md_name])
        print(f"wrote {directory / csv_name} ({len(table)} jobs) and {directory / md_name}")


def report(args) -> None:
    """`report`: the report's figures (and the summary) of each sweep, all planned before any is written."""
    from fmnist.results.report import planned_report
    from fmnist.results.sweep import summary_files

    # Every sweep read and checked, its summary made, before any file is written: a refusal writes nothing.
    planned = [(directory, planned_report(directory), summary_files(directory)[1]) for directory in args.dirs]
    for directory, write_figures, summary in planned:
        figures = write_figures()  # first: a report that fails while drawing leaves the summary as it was
        for path, text in summary.items():
            atomic_write(path, text)
        for path in figures:
            print(path)
        if not figures:  # e.g. every job failed before its first epoch: say so rather than print nothing
            print(f"{directory}: no figure to draw (no job has an epoch recorded); its summary.md lists the jobs "
                  "and how each ended", file=sys.stderr)


def leaderboard(args) -> None:
    """`leaderboard`: the published results, then each completed setting of the sweeps, as markdown."""
    from fmnist.results.leaderboard import markdown

    print(markdown(args.dirs), end="")


def tricks(args) -> None:
    """`tricks`: raw vs EMA weights under each TTA mode on validation, evaluated, or read back (--from-csv)."""
    from fmnist.results.compare import read_tricks_table, tricks_markdown

    if args.from_csv:
        print(tricks_markdown(read_tricks_table(args.from_csv)), end="")
        return
    if args.csv:  # refused before the work, as predict.py and export.py refuse an existing out=
        check_output_file(args.csv, "--csv", None, lambda head: False, "tricks")
        if not args.csv.parent.is_dir():  # else the table is lost after the whole evaluation
            what = "a file, not a directory" if args.csv.parent.exists() else "not an existing directory"
            raise ConfigError(f"--csv names {args.csv}, in {args.csv.parent}, which is {what}; "
                              "nothing was evaluated. Create the directory, or choose a file in one that exists.")
        check_writable(args.csv.parent, key="--csv")
    from fmnist.inference.tricks import compare

    table = compare(args.dirs, args.data_dir, args.batch_size)
    if args.csv:
        with atomic_output(args.csv, replace=False) as tmp:
            table.to_csv(tmp, index=False)
    print(tricks_markdown(table), end="")


def changes(args) -> None:
    """`changes`: each setting of the sweeps against the baseline sweep, paired by seed on validation."""
    from fmnist.results.compare import changes, changes_markdown

    print(changes_markdown(changes(args.dirs[0], args.dirs[1:])), end="")


def images(args) -> None:
    """`images`: two runs or one-setting sweeps paired by seed and by image (McNemar, an interval over both)."""
    from fmnist.results.compare import image_comparison, image_comparison_markdown

    rows, difference = image_comparison(args.dirs[0], args.dirs[1], args.split)
    print(image_comparison_markdown(rows, difference, (str(args.dirs[0]), str(args.dirs[1])), args.split), end="")


VERBS = {"summary": (summary, "rewrite each sweep's summary.csv and summary.md"),
         "report": (report, "the report's figures into DIR/figures/"),
         "leaderboard": (leaderboard, "published results, then each completed setting (markdown)"),
         "tricks": (tricks, "raw vs EMA weights under each TTA mode, on validation"),
         "changes": (changes, "each setting against a baseline sweep, paired by seed on validation"),
         "images": (images, "two runs or sweeps paired by seed and by image (McNemar, an interval over both)")}
WRITING_VERBS = ("summary", "report")  # they write into the sweep directories; the others print (tricks --csv aside)


def parser() -> argparse.ArgumentParser:
    top = UnknownOptionFirstParser(prog="python -m fmnist.results", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (_, help) in VERBS.items():
        sub = verbs.add_parser(name, help=help)
        if name == "images":
            sub.add_argument("dirs", nargs=2, metavar="DIR", type=path_argument,
                             help="two run directories, or two sweep directories of one setting each")
            sub.add_argument("--split", choices=("val", "test"), default="val",
                             help="which images (validation chooses; test only reports)")
        elif name == "changes":
            sub.add_argument("dirs", nargs="+", metavar="DIR", type=path_argument,
                             help="the baseline sweep (one setting, several seeds), then the sweeps to compare with it")
        else:
            sub.add_argument("dirs", nargs="*" if name == "tricks" else "+", metavar="DIR", type=path_argument,
                             help="sweep directories, e.g. outputs/study-cpu" if name != "tricks" else
                             "sweep directories of one setting's seeds, or its run directories")
        if name == "tricks":
            sub.add_argument("--from-csv", type=path_argument, metavar="FILE",
                             help="render a table that `tricks --csv FILE` wrote, instead of evaluating DIRs")
            sub.add_argument("--data-dir", type=path_argument, help="where the training CSV is, if not where the runs were trained")
            sub.add_argument("--csv", type=output_path_argument, help="also write the table here")
            sub.add_argument("--batch-size", type=positive_int, metavar="N",
                             help="images per evaluation batch (default: each run's own evaluation batch size)")
    return top


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked whole: argparse's own exit (2, its message on stderr) on a bad one."""
    main_parser = parser()
    args = main_parser.parse_args(argv)
    if args.verb == "changes" and len(args.dirs) < 2:
        main_parser.error("changes needs a baseline sweep and at least one sweep to compare with it")
    if args.verb == "tricks" and bool(args.dirs) == bool(args.from_csv):
        main_parser.error("tricks takes sweep or run directories, or --from-csv FILE: "
                          + ("not both" if args.dirs else "give one of them"))
    if args.verb == "tricks" and args.from_csv and args.batch_size:
        main_parser.error("tricks --batch-size sizes an evaluation, and --from-csv evaluates nothing: give one of them")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> None:
        if args.verb != "images":  # a run directory is an answer there, and among tricks' directories
            # every directory checked before anything is written
            args.dirs = [d if args.verb == "tricks" and (d / METRICS_FILE).is_file() else sweep_dir(d) for d in args.dirs]
        check_given_once(args.dirs)
        with storage_errors(key=None):  # e.g. a file named `figures` where the report makes its directory
            VERBS[args.verb][0](args)
    return run_plain(work, unwind_on_sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
