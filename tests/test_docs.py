"""The docs' tables of results are generated from the committed results and kept up to date."""

import errno
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist.stops import Terminated
from fmnist.errors import ConfigError
from fmnist.results.generated import render
from tests.conftest import ROOT


def test_every_generated_table_in_the_docs_matches_the_committed_results(tmp_path, monkeypatch, capsys):
    # Run from elsewhere: the blocks name results by paths from the repository root, and are run from there.
    monkeypatch.chdir(tmp_path)
    script = runpy.run_path(str(ROOT / "scripts" / "render_docs.py"))
    code = script["main"](["--check"])
    out, err = capsys.readouterr()
    assert code == 0, f"run `make docs`:\n{out}{err}"
    assert sum((ROOT / "docs" / "performance.md").read_text().count(marker)
               for marker in ("<!-- generated: ", "<!-- end generated -->")) >= 10


def test_a_generated_block_is_rewritten_from_its_command_and_a_bad_one_is_refused(monkeypatch):
    monkeypatch.chdir(ROOT)
    text = ("before\n<!-- generated: python -m fmnist.results tricks --from-csv docs/results/cpu_best/tricks.csv -->\n"
            "| stale |\n<!-- end generated -->\nafter\n")
    new = render(text, "page.md")
    assert new.startswith("before\n<!-- generated: ") and new.endswith("<!-- end generated -->\nafter\n")
    assert "| stale |" not in new and "| ema | flip |" in new
    with pytest.raises(ConfigError, match="page.md, line 2: .*failed \\(exit 2\\).*nosuch"):
        render(text.replace("docs/results/cpu_best/tricks.csv", "nosuch.csv"), "page.md")
    with pytest.raises(ConfigError, match="page.md, line 2: .*must start with `python -m fmnist.results`"):
        render(text.replace("python -m fmnist.results", "rm -rf"), "page.md")
    command = "tricks --from-csv docs/results/cpu_best/tricks.csv"
    for other, words in [("tricks --from-csv 'docs", "cannot read the generated block's command .*No closing quotation"),
                         (f"{command} --bogus", "does not print a table \\(.*unrecognized arguments: --bogus\\)"),
                         ("--help", "does not print a table \\(it prints the command's help\\)"),
                         ("changes docs/results/speedrun_cpu", "does not print a table \\(.*changes needs a baseline"),
                         # `make docs --check` changes nothing: not a sweep's summary files, nor a --csv
                         ("summary docs/results/speedrun_cpu", "writes files; a generated block's command only prints"),
                         ("tricks docs/results/speedrun_cpu --csv x.csv", "writes files")]:
        with pytest.raises(ConfigError, match=f"page.md, line 2: .*{words}"):
            render(text.replace(command, other), "page.md")


BLOCK = ("<!-- generated: python -m fmnist.results tricks --from-csv docs/results/cpu_best/tricks.csv -->\n"
         "| stale |\n")
END = "<!-- end generated -->\n"


@pytest.mark.parametrize("page,words", [
    # The middle block's table once replaced the prose up to the next block's end marker, and said `rewrote`.
    ("intro\n" + BLOCK + "prose\n" + BLOCK + END + "outro\n",
     "line 2: the generated block that starts here has no `<!-- end generated -->` before the next block's start "
     "marker, on line 5"),
    # The last block was never matched: `--check` passed with its table stale.
    ("intro\n" + BLOCK + END + "prose\n" + BLOCK + "outro\n",
     "line 6: the generated block that starts here has no `<!-- end generated -->` before the end of the file"),
    ("intro\n" + BLOCK + END + "prose\n" + END + "outro\n", "line 6: an `<!-- end generated -->` that closes no block"),
    (END + "intro\n" + BLOCK + END, "line 1: an `<!-- end generated -->` that closes no block"),
], ids=["middle block unclosed", "last block unclosed", "end after a block", "end before any block"])
def test_a_block_without_its_own_end_marker_or_an_end_without_a_block_is_refused_and_nothing_is_written(
        tmp_path, page, words):
    from fmnist.results.generated import update

    path = tmp_path / "page.md"
    path.write_text(page)
    for check in (True, False):
        with pytest.raises(ConfigError, match=re.escape(f"{path}, {words}")) as refusal:
            update([path], check=check, root=ROOT)
        assert ("Nothing was written." in str(refusal.value)) is not check
        assert path.read_text() == page


def test_a_refused_page_leaves_the_pages_before_it_unwritten_and_a_block_that_fails_is_named_by_line(tmp_path):
    from fmnist.results.generated import update

    stale, bad = tmp_path / "a.md", tmp_path / "b.md"
    stale.write_text("intro\n" + BLOCK + END)
    bad.write_text("intro\n\n" + BLOCK.replace("docs/results/cpu_best/tricks.csv", "nosuch.csv") + END)
    with pytest.raises(ConfigError, match=f"{re.escape(str(bad))}, line 3: .*failed \\(exit 2\\).*nosuch.csv.* "
                                          "Nothing was written.$"):
        update([stale, bad], root=ROOT)
    assert stale.read_text() == "intro\n" + BLOCK + END
    bad.write_text("intro\n")
    assert update([stale, bad], root=ROOT) == [stale]
    assert "| stale |" not in stale.read_text() and "| ema | flip |" in stale.read_text()


@pytest.mark.parametrize("full_at", ["a.md", "b.md"])
def test_a_write_that_fails_leaves_every_page_as_it_was(tmp_path, monkeypatch, full_at):
    # A full disk found when one page is flushed to disk: neither page is renamed into place, whichever it is (the
    # other one's flush comes before or after it).
    from fmnist.results.generated import update

    first, second = tmp_path / "a.md", tmp_path / "b.md"
    for page in (first, second):
        page.write_text("intro\n" + BLOCK + END)
    fsync = os.fsync

    def disk_full_for_one(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{full_at}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_for_one)
    with pytest.raises(OSError, match="No space left"):
        update([first, second], root=ROOT)
    assert first.read_text() == second.read_text() == "intro\n" + BLOCK + END
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.md"]  # no temporary file left either
    monkeypatch.undo()
    assert update([first, second], root=ROOT) == [first, second]
    assert "| ema | flip |" in first.read_text() and "| ema | flip |" in second.read_text()


def test_a_written_tricks_table_is_rendered_without_importing_the_evaluation():
    # `make docs` renders the committed table in a second or two: the evaluation's torch is not imported for it.
    code = ("import sys\nfrom fmnist.results.__main__ import main\n"
            "code = main(['tricks', '--from-csv', 'docs/results/cpu_best/tricks.csv'])\n"
            "print(code, 'torch' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stderr.split()[-2:] == ["0", "False"], result.stderr[-2000:]
    assert "| ema | flip |" in result.stdout


def test_a_page_that_is_not_text_is_named(tmp_path):
    from fmnist.results.generated import update

    (tmp_path / "binary.md").write_bytes(b"\xff\xfe\n")
    (tmp_path / "folder.md").mkdir()
    for page in ("binary.md", "folder.md"):
        with pytest.raises(ConfigError, match=f"{tmp_path / page}: cannot read it as a UTF-8 text file"):
            update([tmp_path / page], check=True)


def test_results_verbs_refuse_a_foreign_table_and_a_missing_baseline(tmp_path, capsys):
    from fmnist.results.__main__ import main

    foreign = tmp_path / "other.csv"
    foreign.write_text("weights,tta\nraw,none\n")
    assert main(["tricks", "--from-csv", str(foreign)]) == 2
    assert "other.csv: not a table `tricks --csv` wrote: it lacks the columns val_acc_mean" in capsys.readouterr().err
    # An existing --csv is refused before any evaluation, without advice to use an option tricks does not have.
    assert main(["tricks", str(ROOT / "docs" / "results" / "speedrun_cpu"), "--csv", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "--csv names" in err and "already exists; nothing was written" in err and "overwrite" not in err
    assert foreign.read_text() == "weights,tta\nraw,none\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["changes", str(ROOT / "docs" / "results" / "speedrun_cpu")])
    assert exit_info.value.code == 2 and "changes needs a baseline sweep" in capsys.readouterr().err
    for given, words in (([], "give one of them"), ([str(ROOT), "--from-csv", str(foreign)], "not both")):
        with pytest.raises(SystemExit) as exit_info:
            main(["tricks", *given])
        assert exit_info.value.code == 2 and f"tricks takes sweep or run directories, or --from-csv FILE: {words}" \
            in capsys.readouterr().err
    # A directory given twice, under one name or two, would count its runs twice.
    sweep = ROOT / "docs" / "results" / "speedrun_cpu"
    assert main(["leaderboard", str(sweep), str(sweep)]) == 2
    assert f"{sweep} is given twice: its runs would be counted twice" in capsys.readouterr().err
    assert main(["tricks", str(sweep), str(sweep.parent / ".." / "results" / sweep.name)]) == 2
    assert "are the same directory" in capsys.readouterr().err


@pytest.mark.parametrize("row,words", [
    ("ema,flip,abc,0.1,3,0.1,0.1", "column val_acc_mean: expected a number, found 'abc'"),
    ("ema,flip,0.9,0.1,,0.1,0.1", "column n: expected a whole number of 0 or more, found an empty cell"),
    ("ema,flip,0.9,0.1,2.5,0.1,0.1", "column n: expected a whole number of 0 or more, found 2.5"),
    ("ema,flip,0.9,0.1,0,0.1,0.1", "column n: expected a number of runs (1 to 1e+09), found 0"),
    ("ema,flip,0.9,0.1,30000000000000000000000,0.1,0.1", "column n: expected a number of runs (1 to 1e+09), found 3e+22"),
    ("ema,flip,0.9,-0.5,3,0.1,0.1", "column val_acc_std: expected a standard deviation (0 to 1) or an empty cell, "
                                    "found -0.5"),
    ("ema,flip,inf,0.1,3,0.1,0.1", "column val_acc_mean: expected an accuracy (0 to 1) or an empty cell, found inf"),
])
def test_a_tricks_table_with_a_damaged_cell_is_named_by_file_line_and_column(tmp_path, capsys, row, words):
    from fmnist.results.__main__ import main

    table = tmp_path / "tricks.csv"
    table.write_text("weights,tta,val_acc_mean,val_acc_std,n,change_mean,change_std\nraw,none,0.9,0.1,3,0,0\n" + row + "\n")
    assert main(["tricks", "--from-csv", str(table)]) == 2
    err = capsys.readouterr().err
    assert f"tricks.csv, line 3, {words}." in err and "Traceback" not in err


@pytest.mark.parametrize("rows,words", [
    ("", "tricks.csv: holds no rows, the reference of every change"),
    ("ema,flip,0.9,0.1,3,0,0", "tricks.csv: lacks the row of weights raw, tta none, the reference of every change"),
    ("raw,none,0.9,0.1,3,0,0\n,flip,0.9,0.1,3,0,0", "tricks.csv, line 3: an empty weights cell"),
    ("raw,none,0.9,0.1,3,0,0\nema,flip,,0.1,3,0,0", "tricks.csv, line 3: an empty val_acc_mean cell"),
    ("raw,none,0.9,0.1,3,0,0\nfoo,flip,0.9,0.1,3,0,0", "tricks.csv, line 3: weights 'foo', tta 'flip'; expected"),
    ("raw,none,0.9,0.1,3,0,0\nema,none,0.9,,1,0,\nema,none,0.9,0.1,3,0,0",
     "tricks.csv, line 4: a second row of weights ema, tta none"),
    # Cut short (fewer rows: a weaker Holm correction), rows of two tables, an edited reference: rendered without a word.
    ("raw,none,0.9,0.1,3,0,0\nraw,flip,0.9,0.1,3,0.01,0.01", "tricks.csv: lacks the row of weights raw, tta flip_shift;"),
    ("raw,none,0.9,0.1,3,0,0\nraw,flip,0.9,0.1,3,0.01,0.01\nraw,flip_shift,0.9,0.1,3,0.01,0.01\nema,none,0.9,0.1,3,0,0",
     "tricks.csv: lacks the row of weights ema, tta flip and 1 more;"),
    ("raw,none,0.9,0.1,3,0,0\nraw,flip,0.9,0.1,9,0.01,0.01\nraw,flip_shift,0.9,0.1,3,0.01,0.01",
     "tricks.csv: its rows count different numbers of runs (n: 3, 9)"),
    ("raw,none,0.9,0.1,3,0.02,0\nraw,flip,0.9,0.1,3,0.01,0.01\nraw,flip_shift,0.9,0.1,3,0.01,0.01",
     "tricks.csv: the reference row (weights raw, tta none) has a change of 0.02"),
])
def test_a_tricks_table_that_tricks_csv_would_not_write_is_named(tmp_path, capsys, rows, words):
    from fmnist.results.__main__ import main

    table = tmp_path / "tricks.csv"
    table.write_text("weights,tta,val_acc_mean,val_acc_std,n,change_mean,change_std\n" + rows + "\n")
    assert main(["tricks", "--from-csv", str(table)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and "|" not in err


def test_tricks_refuses_dash_as_its_csv_rather_than_writing_a_file_named_dash(tmp_path, capsys, monkeypatch):
    from fmnist.results.__main__ import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["tricks", str(ROOT / "docs" / "results" / "speedrun_cpu"), "--csv", "-"])
    assert stop.value.code == 2 and "`-` (standard output) is not written to here" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_tricks_refuses_a_csv_in_a_missing_directory_before_evaluating(tmp_path, capsys, monkeypatch):
    import fmnist.inference.tricks
    from fmnist.results.__main__ import main

    monkeypatch.setattr(fmnist.inference.tricks, "compare", lambda *args: pytest.fail("evaluated, then refused"))
    out = tmp_path / "missing" / "tricks.csv"
    assert main(["tricks", str(ROOT / "docs" / "results" / "speedrun_cpu"), "--csv", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--csv names {out}, in {out.parent}, which is not an existing directory" in err
    assert not out.parent.exists()


@pytest.mark.parametrize("stop,code,words", [(KeyboardInterrupt, 130, "Ctrl-C"), (Terminated, 143, "SIGTERM")])
def test_make_docs_stopped_while_a_block_runs_stops_and_is_not_a_failed_block(tmp_path, monkeypatch, capsys, stop, code,
                                                                                words):
    from fmnist.results import compare

    page = tmp_path / "page.md"
    page.write_text("intro\n" + BLOCK + END)

    def stopped(path):
        raise stop  # Ctrl-C, or what SIGTERM raises (fmnist.stops.sigterm_unwinds), while the block's verb reads

    monkeypatch.setattr(compare, "read_tricks_table", stopped)
    script = runpy.run_path(str(ROOT / "scripts" / "render_docs.py"))
    monkeypatch.setitem(script["main"].__globals__, "DOCS", [page])
    assert script["main"]([]) == code
    err = capsys.readouterr().err
    assert err.startswith(f"error: stopped by {words};") and "failed" not in err and "page.md" not in err, err
    assert page.read_text() == "intro\n" + BLOCK + END and sorted(tmp_path.iterdir()) == [page]


# SIGTERM while `make docs` writes a page: the page's temporary file is removed, as every other command removes its own.
SIGTERM_WHILE_A_PAGE_IS_WRITTEN = """
import contextlib, os, runpy, signal, sys, time
from pathlib import Path
import fmnist.fsio

page = Path(sys.argv[1])

@contextlib.contextmanager
def cut_short(path):
    with fmnist.fsio.atomic_output(path) as tmp:
        yield tmp  # the page is written to its temporary file, then SIGTERM comes before it is renamed into place
        assert tmp.exists()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)

import fmnist.results.generated
fmnist.results.generated.atomic_output = cut_short
script = runpy.run_path(sys.argv[2])
script["main"].__globals__["DOCS"] = [page]
sys.exit(script["main"]([]))
"""


def test_make_docs_stopped_by_sigterm_while_it_writes_a_page_leaves_no_temporary_file(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n" + BLOCK + END)
    done = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_A_PAGE_IS_WRITTEN, str(page),
                           str(ROOT / "scripts" / "render_docs.py")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 143 and done.stderr.startswith("error: stopped by SIGTERM;"), done.stderr[-3000:]
    assert page.read_text() == "intro\n" + BLOCK + END and sorted(tmp_path.iterdir()) == [page]
