"""Matplotlib figures: a run's (TensorBoard, its confusion matrix), an evaluation's, the report's and a tune study's."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmnist import CLASS_NAMES, IMAGE_SIDE  # noqa: E402
from fmnist.fsio import atomic_output  # noqa: E402


def save_png(fig: plt.Figure, path, dpi: int) -> None:
    """Write `fig` to `path` as a PNG, whole or not at all (`atomic_output`), and close it either way."""
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def confusion_matrix_figure(cm: np.ndarray, title: str = "Test-set confusion matrix") -> plt.Figure:
    """Counts per (true, predicted) class, with class names and per-cell numbers."""
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    threshold = cm.max() / 2
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    accuracy = np.trace(cm) / max(1, cm.sum())
    ax.set_title(f"{title} (accuracy {accuracy:.2%})")
    fig.tight_layout()
    return fig


def misclassified_figure(images: np.ndarray, true: np.ndarray, pred: np.ndarray, cols: int = 8) -> plt.Figure:
    """A grid of misclassified images titled `true -> predicted`.

    Drawn as one image (the tiles pasted into a canvas of the background value) in one Axes: a subplot per
    tile made this figure cost about a second of layout at the end of every run.
    """
    images = np.asarray(images, dtype=float).reshape(len(images), IMAGE_SIDE, IMAGE_SIDE)
    n, rows = len(images), max(1, int(np.ceil(len(images) / cols)))
    gap, label = 4, 9  # canvas pixels around a tile, and above it for its two-line title
    pitch_x, pitch_y = IMAGE_SIDE + 2 * gap, IMAGE_SIDE + label + gap
    canvas = np.full((rows * pitch_y, cols * pitch_x), images.min() if n else 0.0)
    fig, ax = plt.subplots(figsize=(cols * 1.6, rows * 1.6 * pitch_y / pitch_x + 0.4))
    for k in range(n):
        y, x = (k // cols) * pitch_y + label, (k % cols) * pitch_x + gap
        canvas[y:y + IMAGE_SIDE, x:x + IMAGE_SIDE] = images[k]
        ax.text(x + IMAGE_SIDE / 2, y - 0.5, f"{CLASS_NAMES[int(true[k])]}\n→ {CLASS_NAMES[int(pred[k])]}",
                fontsize=7, ha="center", va="bottom")
    ax.imshow(canvas, cmap="gray_r", interpolation="nearest")
    ax.axis("off")
    fig.suptitle("Misclassified test images (true → predicted)")
    fig.tight_layout()
    return fig
