"""Every plot of a run is written, as a valid PNG of the expected size."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_dataset
from PIL import Image

from fmnist_jax import Config, fit
from fmnist_jax.plots import confusion_matrix, most_confused

EXPECTED = {"learning_curves.png": (1100, 400), "confusion_matrix.png": (800, 700),
            "predictions.png": (1140, 1050), "most_confused.png": None}


def test_a_run_writes_every_plot(tmp_path):
    fit(Config(model="mlp", epochs=2, batch_size=64, progress=False), data=tiny_dataset(),
        workdir=str(tmp_path))
    for name, size in EXPECTED.items():
        with Image.open(tmp_path / name) as png:
            png.verify()
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG"
            if size:
                assert png.size == size, name
            colours = np.asarray(png.convert("RGB")).reshape(-1, 3)
            assert len(np.unique(colours, axis=0)) > 20  # something was drawn


def test_no_plots_when_turned_off(tmp_path):
    fit(Config(model="mlp", epochs=1, plots=False, progress=False), data=tiny_dataset(),
        workdir=str(tmp_path))
    assert not list(tmp_path.glob("*.png"))


def test_confusion_counts_and_most_confused_pairs():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2, 1, 1, 1])
    m = confusion_matrix(labels, predicted, 3)
    assert m.tolist() == [[1, 2, 0], [1, 1, 0], [0, 3, 1]]
    assert most_confused(m, ["a", "b", "c"], k=3) == [("c", "b", 3), ("a", "b", 2),
                                                      ("b", "a", 1)]
    with pytest.raises(IndexError):
        confusion_matrix(np.array([3]), np.array([0]), 3)


@pytest.mark.parametrize("changes, expected", [
    ({}, "train objective (label smoothing 0.1)"),
    ({"label_smoothing": 0.0}, "train (cross-entropy)"),
])
def test_learning_curves_say_what_the_training_loss_is(changes, expected, monkeypatch,
                                                       tmp_path):
    """With label smoothing the training curve is the smoothed objective, the validation
    curve the plain cross-entropy: the legend says so."""
    from fmnist_jax import plots

    labels = []
    original = plots.plot_learning_curves
    monkeypatch.setattr(plots, "plot_learning_curves",
                        lambda *a: labels.append(a[3]) or original(*a))
    fit(Config(model="mlp", epochs=1, progress=False, **changes), data=tiny_dataset(),
        workdir=str(tmp_path))
    assert labels == [expected]
