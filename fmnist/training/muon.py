"""`Muon`: orthogonalised momentum for the convolution filters, AdamW for every other parameter.

Muon (Jordan et al., 2024; used by airbench's fastest CIFAR-10 runs) replaces each filter bank's
update by the nearest semi-orthogonal matrix to its Nesterov momentum, computed by a few
Newton-Schulz iterations on the bank seen as a matrix [out channels, in channels x kh x kw]. Its
update is scaled to the RMS of an AdamW update (Liu et al., 2025, "Muon is scalable"), so one
`optim.lr` and `optim.weight_decay` serve both halves and a recipe tuned for AdamW can switch with
`optim.name=muon` alone. torch.optim.Muon takes only 2-D parameters, hence this small optimizer.
"""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw

# Coefficients of the quintic Newton-Schulz iteration (Jordan et al.): they push every singular value
# into roughly [0.7, 1.2] in 5 steps rather than to exactly 1, which is what the update needs.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5
# An AdamW update has an RMS of about 0.2 per entry; an orthogonal [a, b] matrix has 1 / sqrt(max(a, b)).
ADAMW_UPDATE_RMS = 0.2


def _newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The iteration itself, on a wide fp32 matrix or a batch of them (each normalised on its own)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the basin
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def orthogonalize(matrix: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """A matrix with `matrix`'s singular vectors and singular values near 1 (Newton-Schulz, in fp32)."""
    tall = matrix.shape[0] > matrix.shape[1]
    x = _newton_schulz(matrix.float().T if tall else matrix.float(), steps)
    return x.T if tall else x


def orthogonalize_together(matrices: list[torch.Tensor], steps: int = NEWTON_SCHULZ_STEPS) -> list[torch.Tensor]:
    """`orthogonalize` of each matrix, computed in one batch: each is turned wide and zero-padded to the
    largest rows and columns. Zero rows and columns stay zero under the iteration and leave the rest
    unchanged, so each result is its own `orthogonalize` up to rounding, from a few batched kernels per iteration
    instead of a few per matrix: worth it where a kernel launch costs more than its arithmetic (a GPU)."""
    tall = [m.shape[0] > m.shape[1] for m in matrices]
    wide = [m.float().T if t else m.float() for m, t in zip(matrices, tall)]
    rows, cols = max(m.shape[0] for m in wide), max(m.shape[1] for m in wide)
    x = _newton_schulz(torch.stack([torch.nn.functional.pad(m, (0, cols - m.shape[1], 0, rows - m.shape[0]))
                                    for m in wide]), steps)
    out = [x[i, :m.shape[0], :m.shape[1]] for i, m in enumerate(wide)]
    return [o.T if t else o for o, t in zip(out, tall)]


def uses_muon(parameter: torch.Tensor) -> bool:
    """Whether `Muon` updates `parameter` by orthogonalised momentum: convolution filters (4-D) only."""
    return parameter.ndim == 4


class Muon(torch.optim.Optimizer):
    """Muon on the convolution filters, AdamW on the rest (biases, batch-norm scales, the classifier).

    lr, weight_decay: for both (decoupled decay, as AdamW); momentum, nesterov: Muon's momentum;
    betas, eps: AdamW's; fused: AdamW's half in one fused kernel, as `torch.optim.AdamW(fused=True)`.
    Parameter groups may set their own lr and weight_decay (the bias rate). Each half steps all its tensors
    in a few multi-tensor operations, however many there are: on a GPU each operation is a kernel launch.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 fused: bool = False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      betas=betas, eps=eps, fused=fused))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self._muon_update([p for p in params if uses_muon(p)], group)
            self._adamw_update([p for p in params if not uses_muon(p)], group)
        return loss

    def _muon_update(self, filters: list[torch.Tensor], group: dict) -> None:
        if not filters:
            return
        grads = [p.grad for p in filters]
        for p in filters:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buffers = [self.state[p]["momentum_buffer"] for p in filters]
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, grads)
        directions = torch._foreach_add(grads, buffers, alpha=group["momentum"]) if group["nesterov"] else buffers
        matrices = [d.reshape(p.shape[0], -1) for p, d in zip(filters, directions)]
        # On an accelerator the filter banks go through Newton-Schulz together (few, larger kernels); on a CPU
        # one by one, where padding to the largest bank would only add arithmetic.
        together = len(matrices) > 1 and matrices[0].device.type != "cpu"
        updates = orthogonalize_together(matrices) if together else [orthogonalize(m) for m in matrices]
        step_sizes = [-group["lr"] * ADAMW_UPDATE_RMS * math.sqrt(max(m.shape)) for m in matrices]
        updates = torch._foreach_mul([u.reshape(p.shape).to(p.dtype) for p, u in zip(filters, updates)], step_sizes)
        torch._foreach_mul_(filters, 1 - group["lr"] * group["weight_decay"])  # decoupled decay, as AdamW's
        torch._foreach_add_(filters, updates)

    def _adamw_update(self, params: list[torch.Tensor], group: dict) -> None:
        """torch's own AdamW step (its functional form) on `params`, with state kept under AdamW's names."""
        fused = group.get("fused", False)  # absent from the optimizer state of a checkpoint saved before it existed
        for p in params:
            if "step" not in self.state[p]:  # where torch.optim.AdamW keeps it: on the device when fused
                step = torch.zeros((), device=p.device) if fused else torch.tensor(0.0)
                self.state[p].update(step=step, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False, fused=fused or None)
