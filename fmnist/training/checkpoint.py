"""Checkpoint files: written atomically, read only through fmnist.fsio.load_checkpoint (`weights_only=True`)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from fmnist.fsio import atomic_write, cut_short_write, load_checkpoint
from fmnist.runs import BEST_CHECKPOINT_PREFIX, LAST_CHECKPOINT
from fmnist.training.signals import signals_deferred

log = logging.getLogger(__name__)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes to a temporary file and renames it into place.

    A kill mid-write leaves the previous `last.ckpt` intact instead of a truncated one, and loading
    (resume, `ckpt_path="best"`) always goes through `load_checkpoint`.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialised in memory first: torch.save reports a full disk as an opaque RuntimeError
        # ("unexpected pos"), a plain write as OSError(ENOSPC), which names the cause. Written as a copy
        # (getvalue), not a view (getbuffer): with a view, a write that failed on a full disk was followed
        # by a crash in the garbage collector (Python 3.12 with torch 2.11); with a copy it was not.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with signals_deferred():
            atomic_write(path, buffer.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path, map_location=map_location or "cpu")


def moved_state(state_dict: dict, dirpath: str | None) -> dict:
    """A ModelCheckpoint's saved state, its paths moved into `dirpath` when it was saved under another one.

    A run directory moved, or reached by another path (another node's mount point), holds the same files under a
    new name. Lightning then drops its record of them (best score, best files, last.ckpt), and the resumed run
    writes `last-v1.ckpt` beside the `last.ckpt` that the resume command names, and keeps a second best file. The
    record is kept instead, its paths moved to where the files now are.
    """
    old = state_dict.get("dirpath")
    if not (old and dirpath and old != dirpath):
        return state_dict

    def moved(path):
        return str(Path(dirpath) / Path(path).name) if path and str(Path(path).parent) == old else path

    return {**state_dict, "dirpath": dirpath,
            **{key: moved(state_dict.get(key)) for key in ("best_model_path", "kth_best_model_path", "last_model_path")
               if key in state_dict},
            "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}}


class SafeModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose end-of-epoch saves (best, then last) complete as one step, and whose
    last.ckpt is always the latest epoch.

    A Ctrl-C or SIGTERM arriving between the two writes would otherwise leave a new best file but
    a stale `last.ckpt`; here it waits until both are written, and the run then stops cleanly.
    """

    def __init__(self, **kwargs):
        # At every epoch's end, validated or not: Lightning would save at the end of validation when
        # `trainer.check_val_every_n_epoch` is above 1, so a kill could lose several epochs, and a resume would
        # start inside the end of the saved epoch (its epochs.csv row rewritten without its training figures).
        super().__init__(**{**kwargs, "save_on_train_epoch_end": True})
        self._validated = False  # whether validation ran in the current epoch

    def format_checkpoint_name(self, metrics, *args, **kwargs) -> str:
        # Lightning counts epochs from 0; file names count them as epochs.csv and people do, from 1.
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, *args, **kwargs)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(moved_state(state_dict, self.dirpath))
        self._remove_what_the_stopped_attempt_left()

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is None:  # started from its first epoch: no best checkpoint here is this run's
            self._remove_what_the_stopped_attempt_left()

    @rank_zero_only
    def _remove_what_the_stopped_attempt_left(self) -> None:
        """Remove the best checkpoints this run does not know of (for a resumed run, those its last.ckpt does not;
        for a run started again from its first epoch, all of them), which an attempt that was stopped wrote (a kill
        between an epoch's best and last files, a disk that filled up at the first last.ckpt), and the temporary
        files of a write that a kill cut short. Else a later `ckpt=RUN` could load the stopped attempt's weights.
        The run holds its directory's lock, so no other process is writing there."""
        if not self.dirpath or not Path(self.dirpath).is_dir():
            return
        known = {Path(p).name for p in (*self.best_k_models, self.best_model_path) if p}
        for path in sorted(Path(self.dirpath).iterdir()):
            stale = (path.name.startswith(BEST_CHECKPOINT_PREFIX) and path.suffix == ".ckpt" and path.name not in known)
            if stale or cut_short_write(path):
                log.warning("removed %s, %s", path, "a best checkpoint of a stopped attempt that this run's "
                            f"{LAST_CHECKPOINT} does not know of" if stale else "left by a write that was cut short")
                path.unlink()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._validated = False

    def on_validation_end(self, trainer, pl_module) -> None:
        self._validated = self._validated or not trainer.sanity_checking
        super().on_validation_end(trainer, pl_module)

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        if not self._validated:
            return  # an epoch without validation has no new score to rank (Lightning would warn of a missing one)
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        with signals_deferred():
            super().on_train_epoch_end(trainer, pl_module)
            self._save_latest(trainer)

    def _save_latest(self, trainer) -> None:
        # Lightning 2.6 writes last.ckpt only at a step that also wrote a best checkpoint, so after an
        # epoch that did not improve, a resume would repeat it (and lose what followed): write it anyway.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
