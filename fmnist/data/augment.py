"""Augmentations applied to a whole batch at once, on whatever device the batch is on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmnist import NUM_CLASSES


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip a random half of the images left-right (Fashion-MNIST labels survive this)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(-1), x)


def shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by its own random offset of up to `max_shift` pixels, zero-filled."""
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1, 1), device=x.device)
    rows = dy + torch.arange(h, device=x.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=x.device).view(1, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def rectangles(top: torch.Tensor, left: torch.Tensor, height: torch.Tensor, width: torch.Tensor,
               h: int, w: int) -> torch.Tensor:
    """[B, h, w] mask of one rectangle per image (each argument [B, 1, 1]); the parts outside the image drop out."""
    ys = torch.arange(h, device=top.device).view(1, h, 1)
    xs = torch.arange(w, device=top.device).view(1, 1, w)
    return (ys >= top) & (ys < top + height) & (xs >= left) & (xs < left + width)


def erase(x: torch.Tensor, p: float, min_side: int = 4, max_side: int = 14) -> torch.Tensor:
    """Zero a random rectangle in each image with probability `p` (random erasing)."""
    b, _, h, w = x.shape
    device = x.device
    rect_h = torch.randint(min_side, max_side + 1, (b, 1, 1), device=device)
    rect_w = torch.randint(min_side, max_side + 1, (b, 1, 1), device=device)
    top = (torch.rand(b, 1, 1, device=device) * (h - rect_h + 1)).long()
    left = (torch.rand(b, 1, 1, device=device) * (w - rect_w + 1)).long()
    inside = rectangles(top, left, rect_h, rect_w, h, w)
    apply = (torch.rand(b, 1, 1, device=device) < p)
    return x.masked_fill((inside & apply).unsqueeze(1), 0.0)


def augment(x: torch.Tensor, flip: bool = False, max_shift: int = 0, erase_p: float = 0.0) -> torch.Tensor:
    """Apply the configured augmentations to a float batch [B, C, H, W]."""
    if flip:
        x = hflip(x)
    if max_shift > 0:
        x = shift(x, max_shift)
    if erase_p > 0:
        x = erase(x, erase_p)
    return x


def cutmix(x: torch.Tensor, labels: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al., 2019), per image: with probability `p`, paste a rectangle of another image of the
    batch into it. The rectangle covers a fraction 1 - lam of the image, lam ~ Uniform(0, 1), centred
    anywhere and clipped at the border; the target gives each of the two labels the share of pixels it
    shows. Returns the images and (B, NUM_CLASSES) target probabilities (one-hot where nothing was pasted)."""
    b, _, h, w = x.shape
    device = x.device
    partner = torch.randperm(b, device=device)
    side = (1 - torch.rand(b, 1, 1, device=device)).sqrt()  # of the unclipped rectangle, as a fraction
    half_h, half_w = (side * h / 2).round().long(), (side * w / 2).round().long()
    cy = torch.randint(0, h, (b, 1, 1), device=device)
    cx = torch.randint(0, w, (b, 1, 1), device=device)
    inside = rectangles(cy - half_h, cx - half_w, 2 * half_h, 2 * half_w, h, w)
    inside &= torch.rand(b, 1, 1, device=device) < p
    pasted = inside.flatten(1).float().mean(1, keepdim=True)  # the partner's share, after clipping
    mixed = torch.where(inside.unsqueeze(1), x[partner], x)
    target = (1 - pasted) * F.one_hot(labels, NUM_CLASSES) + pasted * F.one_hot(labels[partner], NUM_CLASSES)
    return mixed, target
