"""Matplotlib figures shared by TensorBoard logging and the report script."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmnist import CLASS_NAMES  # noqa: E402


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
    """A grid of misclassified images titled `true -> predicted`."""
    n = len(images)
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(np.asarray(images[k]).reshape(28, 28), cmap="gray_r")
            ax.set_title(f"{CLASS_NAMES[int(true[k])]}\n→ {CLASS_NAMES[int(pred[k])]}", fontsize=7)
    fig.suptitle("Misclassified test images (true → predicted)")
    fig.tight_layout()
    return fig
