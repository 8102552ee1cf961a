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


PREFETCH = """
import os, sys
from fmnist_jax import plots
assert "matplotlib" not in sys.modules
before = os.getpriority(os.PRIO_PROCESS, 0)
thread = plots.prefetch()
thread.join()
assert "matplotlib.figure" in sys.modules and "matplotlib.backends.backend_agg" in sys.modules
assert os.getpriority(os.PRIO_PROCESS, 0) == before  # only the prefetch thread was niced
print("ok")
"""


def test_prefetch_imports_matplotlib_in_its_own_thread():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PREFETCH], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_run_that_stops_early_waits_for_the_warm_up_thread(tmp_path):
    """A process that ended while the warm-up thread was inside matplotlib could abort in
    Python's teardown (SIGABRT after a SIGTERM'd run): fit() abandons its reporter, which
    joins the thread."""
    import threading
    import time

    from fmnist_jax import Config
    from fmnist_jax.report import Reporter

    reporter = Reporter(tmp_path, Config())
    reporter.prefetch = threading.Thread(target=time.sleep, args=(0.3,), daemon=True)
    reporter.prefetch.start()
    reporter.abandon()
    assert not reporter.prefetch.is_alive()
