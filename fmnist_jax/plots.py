"""Pictures of a run, as PNG files.

Drawn on ``matplotlib.figure.Figure`` objects, never through ``pyplot``: no backend is
chosen or switched (a notebook's stays as it was) and no window opens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def figure(**kwargs):
    """A new ``matplotlib.figure.Figure`` (``figsize``, ``dpi``, ...), outside pyplot."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _margins(fig, left: float, right: float, bottom: float, top: float, **spacing) -> None:
    """Fixed margins in inches, set for the labels each plot has. ``tight_layout`` would
    measure them by drawing the figure once more, a large share of the plots' time
    (figures in experiments/README.md)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, **spacing)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int = 10
                     ) -> np.ndarray:
    """``m[i, j]`` = number of images of class ``i`` predicted as ``j``."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (labels, predictions), 1)
    return m


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str],
                          path: str | os.PathLike, title: str = "") -> None:
    """Writes the confusion matrix (rows: true class, columns: predicted) as a PNG."""
    fig = figure(figsize=(8, 7), dpi=100)
    ax = fig.subplots()
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
    _margins(fig, left=1.3, right=0.2, bottom=1.2, top=0.4)
    fig.savefig(path)


def plot_learning_curves(history: Sequence[dict], path: str | os.PathLike,
                         title: str = "", train_loss: str = "train") -> None:
    """Loss and accuracy per epoch, training and validation. ``train_loss`` names the
    training curve of the loss: the training objective (label-smoothed, say), where the
    validation curve is the plain cross-entropy."""
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = figure(figsize=(11, 4), dpi=100)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], "o-",
                label=train_loss if metric == "loss" else "train")
        if any(f"val_{metric}" in r for r in history):
            ax.plot(epochs, [r.get(f"val_{metric}") for r in history], "s-",
                    label="validation (cross-entropy)" if metric == "loss" else "validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _margins(fig, left=0.8, right=0.2, bottom=0.6, top=0.5, wspace=0.25)
    fig.savefig(path)


def plot_predictions(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                     class_names: Sequence[str], path: str | os.PathLike,
                     rows: int = 5, cols: int = 6) -> None:
    """A grid of test images titled with the predicted class and its probability: green
    when right, red (with the true class) when wrong.

    The images are tiled into one picture drawn by one ``imshow`` (with a title above each
    tile), several times faster than one axes per image (figures in experiments/README.md)."""
    height, width = images.shape[1:3]
    channels = images.shape[3] if images.ndim == 4 else 1
    gap_x, gap_y = max(width // 4, 4), max(height // 2, 8)  # room for the titles
    grid = np.full((rows * (height + gap_y), cols * (width + gap_x), channels), np.nan)
    predictions = probabilities.argmax(-1)
    fig = figure(figsize=(1.9 * cols, 2.1 * rows), dpi=100)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.98))
    ax.axis("off")
    pixels = _display_range(images[:rows * cols])
    for i in range(len(pixels)):
        r, c = divmod(i, cols)
        top, left = r * (height + gap_y) + gap_y, c * (width + gap_x) + gap_x // 2
        grid[top:top + height, left:left + width] = pixels[i].reshape(height, width, channels)
        right = predictions[i] == labels[i]
        title = f"{class_names[predictions[i]]} {100 * probabilities[i].max():.0f}%"
        if not right:
            title += f"\n(is {class_names[labels[i]]})"
        ax.text(left + width / 2, top - 1, title, ha="center", va="bottom", fontsize=8,
                color="green" if right else "red")
    if channels == 1:
        ax.imshow(np.ma.masked_invalid(grid[..., 0]), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
    else:  # colour: RGB(A) values in 0-1, white between the tiles
        ax.imshow(np.nan_to_num(grid[..., :4], nan=1.0), interpolation="nearest")
    fig.savefig(path)


def _display_range(images: np.ndarray) -> np.ndarray:
    """Pixels in 0-1 for display: uint8 divided by 255, floats by their range."""
    if images.dtype == np.uint8:
        return images / 255.0
    low, high = float(images.min(initial=0.0)), float(images.max(initial=1.0))
    return (images - low) / (high - low if high > low else 1.0)


def most_confused(matrix: np.ndarray, class_names: Sequence[str], k: int = 8
                  ) -> list[tuple[str, str, int]]:
    """The ``k`` largest off-diagonal cells: (true class, predicted class, count)."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None)[:k]
    return [(class_names[i], class_names[j], int(off[i, j]))
            for i, j in zip(*np.unravel_index(order, off.shape)) if off[i, j] > 0]


def plot_most_confused(matrix: np.ndarray, class_names: Sequence[str],
                       path: str | os.PathLike, k: int = 8) -> None:
    """Horizontal bars: how many test images of one class were taken for another."""
    pairs = most_confused(matrix, class_names, k)
    fig = figure(figsize=(8, 0.45 * max(len(pairs), 1) + 1.2), dpi=100)
    ax = fig.subplots()
    ax.barh([f"{t} -> {p}" for t, p, _ in pairs][::-1], [n for *_, n in pairs][::-1],
            color="tab:red")
    ax.set_xlabel("test images (true -> predicted)")
    ax.set_title("most confused pairs")
    _margins(fig, left=2.0, right=0.3, bottom=0.6, top=0.4)
    fig.savefig(path)


def write_run_plots(directory: str | os.PathLike, history: Sequence[dict],
                    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                    class_names: Sequence[str], title: str = "",
                    train_loss: str = "train") -> list[str]:
    """All the pictures of a finished run, from its history and its predictions on the test
    split (the grid shows the first 30 test images); returns the file names written.
    ``train_loss``: the label of the training loss curve (:func:`plot_learning_curves`)."""
    from pathlib import Path

    directory = Path(directory)
    matrix = confusion_matrix(labels, probabilities.argmax(-1), len(class_names))
    accuracy = float(np.trace(matrix) / matrix.sum())
    files = {
        "learning_curves.png": lambda p: plot_learning_curves(history, p, title, train_loss),
        "confusion_matrix.png": lambda p: plot_confusion_matrix(
            matrix, class_names, p, f"{title}: test accuracy {100 * accuracy:.2f}%"),
        "predictions.png": lambda p: plot_predictions(images[:30], labels[:30],
                                                      probabilities[:30], class_names, p),
        "most_confused.png": lambda p: plot_most_confused(matrix, class_names, p),
    }
    for name, draw in files.items():
        draw(directory / name)
    return list(files)
