"""Pictures of a run, as PNG files (matplotlib, non-interactive backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed, never opens a window
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int = 10
                     ) -> np.ndarray:
    """``m[i, j]`` = number of images of class ``i`` predicted as ``j``."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (labels, predictions), 1)
    return m


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str],
                          path: str | os.PathLike, title: str = "") -> None:
    """Writes the confusion matrix (rows: true class, columns: predicted) as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    n = len(class_names)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
