"""The Lightning side of a study's trial: each epoch's validation accuracy given to its Optuna trial, and the run
stopped when the study's pruner says so. Apart from `fmnist.sweeps.tune`, which imports it only once a study's
checks have passed: a refused study spends no time importing Lightning."""

from __future__ import annotations

import lightning as L
import optuna

from fmnist.training.train import RunPruned


class ReportToTrial(L.Callback):
    """Give the trial each epoch's validation accuracy; stop the run when the pruner says so.

    Reported at the training epoch's end, after validation and after EpochCSV (an earlier callback)
    has written the epoch's row, so a pruned run's epochs.csv ends with the epoch that pruned it.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = "val/acc"):
        self.trial = trial
        self.monitor = monitor
        self._value: float | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self.monitor in trainer.callback_metrics:
            self._value = float(trainer.callback_metrics[self.monitor])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._value is None:  # no validation this epoch (check_val_every_n_epoch > 1)
            return
        epoch, value, self._value = trainer.current_epoch + 1, self._value, None  # epochs.csv's numbering
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise RunPruned(f"pruned by the median pruner after epoch {epoch}: {self.monitor} {value:.4f} "
                            "is below the median of earlier trials at that epoch")
