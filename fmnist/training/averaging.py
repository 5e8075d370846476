"""Averaged weights: an exponential moving average of the weights (`optim.ema_decay`), which validation, the
checkpoints and the test see, and lookahead (`optim.lookahead_steps`, `optim.lookahead_alpha`)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


def ema_with_warmup(decay: float):
    """An `AveragedModel` multi-tensor averaging function: EMA whose decay ramps up as min(decay, (1 + n) / (10 + n)).

    A plain EMA starts from the initial weights and forgets them at `decay` per step, so for the
    first few hundred steps it mixes weights far apart in training (and batch-norm statistics that
    match none of them) and scores near chance; the ramp makes the early average follow recent steps.
    Integer buffers (batch-norm's step counters) are copied.
    """
    @torch.no_grad()
    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if averaged[0].is_floating_point():
            # The weight stays a tensor on the model's device: reading the step count would sync a GPU each step.
            n = num_averaged.float()
            weight = 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=decay)
            torch._foreach_mul_(averaged, 1.0 - weight)
            torch._foreach_add_(averaged, torch._foreach_mul(current, weight))
        else:
            torch._foreach_copy_(averaged, current)
    return average


class WeightEMA(WeightAveraging):
    """An EMA of the weights and buffers (`optim.ema_decay`), evaluated wherever the model is.

    Lightning's callback swaps the averaged weights in for validation, saves them as each
    checkpoint's `state_dict` (the raw ones under `current_model_state`, so a resume restores
    both), and copies them into the model when training ends. So `best-*.ckpt`, and everything
    that loads it (the test, evaluate, predict, export), holds the averaged weights.
    """

    def __init__(self, decay: float):
        super().__init__(multi_avg_fn=ema_with_warmup(decay))
        self.updates: int | None = None  # the steps the average holds (its `n_averaged`), once read

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Lightning's callback would also load the raw weights when `trainer.test(ckpt_path=...)` restores
        # a checkpoint after fitting, so the test would score them instead of the averaged weights.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
            self.updates = None  # the loaded average's own count, read at its next update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Lightning's callback, once per optimizer step, but without `AveragedModel.update_parameters`: that reads
        # its step count, a tensor on the model's device, twice per call, which on a GPU is two syncs per step.
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self.update_average(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def update_average(self, pl_module: L.LightningModule) -> None:
        """What `AveragedModel.update_parameters` does (with `use_buffers`, as here), with the step count kept in
        Python: read from the average once (after a resume it is the loaded one's), then counted."""
        average = self._average_model
        if self.updates is None:
            self.updates = int(average.n_averaged)
        averaged = [*average.module.parameters(), *average.module.buffers()]
        current = [t.detach() for t in (*pl_module.parameters(), *pl_module.buffers())]
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            groups: dict[tuple, tuple[list, list]] = {}  # the multi-tensor function takes one device and dtype
            for into, now in zip(averaged, current, strict=True):
                group = groups.setdefault((into.device, into.dtype), ([], []))
                group[0].append(into)
                group[1].append(now)
            for into, now in groups.values():
                average.multi_avg_fn(into, now, average.n_averaged)
        average.n_averaged += 1
        self.updates += 1


class Lookahead(L.Callback):
    """Lookahead (`optim.lookahead_steps`, `optim.lookahead_alpha`): every `steps` optimizer steps the slow
    weights move `alpha` of the way to the trained (fast) ones, and the fast ones restart from them.

    The slow weights are part of every checkpoint, so a resumed run continues exactly. Batch-norm
    statistics are not averaged: they follow the fast weights, as in Zhang et al. (2019).
    """

    def __init__(self, steps: int, alpha: float):
        self.steps, self.alpha = steps, alpha
        self.slow: list[torch.Tensor] | None = None  # set at the start of training, or by a checkpoint
        self.synced_at = 0  # the optimizer step of the last sync (accumulated batches share a step)

    def on_train_start(self, trainer, pl_module) -> None:
        params = list(pl_module.parameters())
        if self.slow is None:
            self.slow = [p.detach().clone() for p in params]
        else:  # from a checkpoint, on the CPU
            self.slow = [s.to(p.device, p.dtype) for s, p in zip(self.slow, params)]

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.synced_at or step % self.steps:
            return
        fast = list(pl_module.parameters())
        torch._foreach_lerp_(self.slow, fast, self.alpha)
        torch._foreach_copy_(fast, self.slow)
        self.synced_at = step

    def state_dict(self) -> dict:
        return {"slow": [s.cpu() for s in self.slow or []], "synced_at": self.synced_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.slow = list(state_dict["slow"]) or None
        self.synced_at = state_dict["synced_at"]
