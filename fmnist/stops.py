"""How a command stops on a signal: SIGTERM raised as `Terminated` so that its clean-up runs (`sigterm_unwinds`), a
hang-up taken as SIGTERM, a parallel sweep's process leaving its workers to stop their jobs, the message and exit
code of a stopped command (130 for Ctrl-C, 143 for SIGTERM), and the stop behind a library's own error. A training
run's own handling of a stop (after the step in progress, recorded `interrupted`) is `fmnist.training.signals`.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

from fmnist.errors import error_in_chain


class Terminated(BaseException):
    """SIGTERM (a time limit, `kill`, `scancel`) raised as an exception, so that the `finally` blocks on the
    way out remove a command's temporary files (fmnist.fsio.atomic_output) instead of leaving them."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextmanager
def sigterm_unwinds(enabled: bool = True):
    """Within the block, SIGTERM raises Terminated in the main thread. In train.py only until a run's checks pass:
    the run then handles SIGTERM itself (fmnist.training.signals), so that inside a fit it stops after the step and
    saves, as Lightning does, instead of at once."""
    if not enabled or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def hangup_as_sigterm() -> None:
    """A hang-up (the terminal closed, an ssh session dropped) stops the command as SIGTERM does, so that a run is
    recorded `interrupted` and can be resumed instead of dying with a record that says `running`. A hang-up that
    is ignored (`nohup`) stays ignored."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))


# (message, exit code) of a command stopped by a signal outside a training run; a run records its own stop
# (runs.INTERRUPTED) and how to resume it.
_STOPPED = ("its temporary files are removed, and each file it writes is either whole or as it was before (a "
            "command that writes several may have written some of them).")
SIGTERM_EXIT = (f"stopped by SIGTERM; {_STOPPED}", 128 + signal.SIGTERM)
CTRL_C_EXIT = (f"stopped by Ctrl-C; {_STOPPED}", 128 + signal.SIGINT)


def signals_leave_the_workers_to_stop() -> None:
    """In a parallel sweep's own process (joblib): Ctrl-C or SIGTERM ends it at once, exit 130 or 143, without the
    launcher's clean-up, which killed the workers before they could record their jobs (left `running`). Each worker
    then stops its job as Ctrl-C or SIGTERM stops a run, on its own signal or on finding the sweep gone
    (fmnist.sweeps.placement): recorded `interrupted`, and the same command resumes the sweep."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # no logging here: it runs between any two bytecodes of the main thread
        name = b"Ctrl-C" if signum == signal.SIGINT else b"SIGTERM"
        os.write(2, b"error: stopped by " + name + b": each running job stops at its next step and is recorded "
                    b"`interrupted`; the same command resumes the sweep.\n")
        os._exit(128 + signum)

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (e.g. a background job)
        signal.signal(signal.SIGINT, handler)
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _raise_terminated):
        signal.signal(signal.SIGTERM, handler)


def stopped_by_ctrl_c(error: BaseException) -> bool:
    """Whether `error` is how Ctrl-C stopped the work: a KeyboardInterrupt, or the sys.exit(1) that Lightning
    raises while handling one inside a fit."""
    return isinstance(error, KeyboardInterrupt) or (isinstance(error, SystemExit)
                                                    and isinstance(error.__context__, KeyboardInterrupt))


def stop_behind(error: BaseException) -> KeyboardInterrupt | Terminated | None:
    """The Ctrl-C (KeyboardInterrupt) or SIGTERM (Terminated) that `error` was raised while handling, if any. A
    stop lands wherever the main thread is: inside a library that fails on it with an error of its own (torch's
    ONNX exporter, stopped while it imports torch._dynamo, raises TorchExportError), it must still end the
    command as that stop, not as a crash with a traceback."""
    return error_in_chain(error, (KeyboardInterrupt, Terminated))
