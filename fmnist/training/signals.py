"""How a run stops for a signal: SIGTERM raises from a run's first write on, Ctrl-C stops the run at the next
step as SIGTERM does, under DDP every rank stops after the same step (`StopTogether`), a checkpoint's write is
never cut in half, and which signal ended a run (`stopping_signal`).

The other places that handle signals, around a run: `fmnist.stops` (a command's start: SIGTERM unwinds what Hydra
wrote early, SIGHUP is SIGTERM, a joblib sweep leaves signals to its workers), `fmnist.sweeps.placement`
(`exit_if_orphaned`: a joblib worker whose sweep died) and `fmnist.sweeps.tune` (a study stops before its next
trial)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmnist.stops import stopped_by_ctrl_c


# Set by every SIGTERM a run sees, even one that Lightning's handler took after its last check for it (during the
# final validation or test), which the run then does not stop for: a study stops on it before its next trial.
SIGTERM_RECEIVED = threading.Event()


@contextmanager
def sigterm_raises():
    """SIGTERM raises SIGTERMException from the first write on (`fmnist.training.claim.claimed` installs this once the
    run's checks pass; before, while they run, SIGTERM unwinds the command: fmnist.stops.sigterm_unwinds): a run stopped while it starts is still recorded `interrupted`, with its
    resume command.

    Inside fit and test Lightning's handler runs first and calls this one; there the run stops at the
    next step boundary (Lightning's way) rather than in the middle of a write.
    """
    def handler(signum, frame):
        SIGTERM_RECEIVED.set()
        if signal.getsignal(signal.SIGTERM) is handler:
            raise SIGTERMException()

    previous = signal.signal(signal.SIGTERM, handler) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def ctrl_c_stops_at_a_step(trainer: L.Trainer):
    """Within the block (fit, test), Ctrl-C stops the run at the next step, as Lightning stops it for SIGTERM,
    and is then raised as KeyboardInterrupt; a second Ctrl-C raises at once.

    Raised wherever the main thread happens to be, a KeyboardInterrupt can land inside a library's code:
    once in about 40 stops, the run then hung while closing TensorBoard's writer, whose thread had not
    been woken (presumably interrupted inside its queue). A SIGINT that is ignored (a background job)
    stays ignored.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []

    def handler(signum, frame):  # no I/O here: it runs between any two bytecodes of the main thread
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
        stop_after_this_step(trainer)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    except SIGTERMException as e:
        if caught:
            raise KeyboardInterrupt from e
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:  # after the last step: the run still stops here, before anything else starts
        raise KeyboardInterrupt


def stop_after_this_step(trainer: L.Trainer) -> None:
    """Stop the run after the step in progress, as Lightning stops it for SIGTERM: in one process by Lightning's
    own flag, checked after each step; under DDP once the ranks agree (`StopTogether`). No I/O: signal handlers
    call it."""
    together = next((c for c in trainer.callbacks if isinstance(c, StopTogether)), None)
    if together is not None and trainer.world_size > 1:
        together.requested = True
    else:
        trainer._signal_connector.received_sigterm = True


class StopTogether(L.Callback):
    """Under DDP, a SIGTERM or Ctrl-C stops every rank after the same training step.

    Lightning's own SIGTERM handler runs a broadcast from inside the handler, wherever each rank's main thread
    is, and stops each rank on its own flag: a SIGTERM to the whole process group (`timeout`, `scancel`, a closed
    terminal), which reaches every rank and reaches rank 1 a second time through rank 0, left a 2-process run
    waiting forever, one rank in that broadcast and the other in a step's all-reduce. Here a signal only marks its
    rank; after each training step the ranks agree whether any was marked (one all-reduce of a flag), and all stop
    at that step. A signal during validation waits for the next training step; one after the last (in the final
    validation) stops the run once fit ends, before its test, and one during the test once the test ends: either
    way the run is `interrupted`, as in one process, not `completed` as if no signal had come.
    """

    def __init__(self):
        self.requested = False

    def _on_sigterm(self, signum, frame):  # no I/O here: it runs between any two bytecodes of the main thread
        SIGTERM_RECEIVED.set()
        self.requested = True

    def _take_sigterm(self, trainer: L.Trainer) -> None:
        # Lightning installs its handler as each of fit and test begins, and puts back the one before at their end.
        if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_sanity_check_start(self, trainer, pl_module):
        self._take_sigterm(trainer)

    def on_train_start(self, trainer, pl_module):
        self._take_sigterm(trainer)

    def on_test_start(self, trainer, pl_module):
        self._take_sigterm(trainer)

    def _any_rank_requested(self, trainer: L.Trainer) -> bool:
        return trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(self.requested, all=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._any_rank_requested(trainer):
            trainer._signal_connector.received_sigterm = True  # on every rank at once: all stop after this step

    # No training step is left to stop at: every rank reaches these ends, and all raise there together.
    def on_train_end(self, trainer, pl_module):
        if self._any_rank_requested(trainer):
            raise SIGTERMException

    def on_test_end(self, trainer, pl_module):
        if self._any_rank_requested(trainer):
            raise SIGTERMException


@contextmanager
def signals_deferred():
    """Hold Ctrl-C and SIGTERM until the block ends: a checkpoint write is never cut in half.

    A signal caught meanwhile is raised again right after, so the run still stops, at a point
    where it can record that it was interrupted.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in caught:
            signal.raise_signal(sig)


def stopping_signal(error: BaseException) -> int | None:
    """SIGINT or SIGTERM when `error` is how that signal stopped a run, else None."""
    if stopped_by_ctrl_c(error):
        return signal.SIGINT
    return signal.SIGTERM if isinstance(error, SIGTERMException) else None  # Lightning's, or `sigterm_raises`'
