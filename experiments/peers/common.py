"""What the peer scripts share: the same data, read from the same official IDX files.

Kept free of fmnist_jax (the peers run in their own environment, without JAX)."""

import gzip
import json
import os
import resource
import sys
from pathlib import Path

import numpy as np

MEAN, STD = 72.9404 / 255.0, 90.0212 / 255.0  # as fmnist_jax.steps.normalize


def _idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(validation_size: int = 5000):
    """Standardised float32 images (N, 28, 28), int64 labels: train (without the first
    ``validation_size``, as fmnist_jax) and test."""
    root = Path(os.environ["FMNIST_DATA_DIR"])
    x = (_idx(root / "train-images-idx3-ubyte.gz") / 255.0 - MEAN) / STD
    y = _idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xt = (_idx(root / "t10k-images-idx3-ubyte.gz") / 255.0 - MEAN) / STD
    yt = _idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return (x[validation_size:].astype(np.float32), y[validation_size:],
            xt.astype(np.float32), yt)


def report(epoch_times, test_accuracies, first_step_time):
    print(json.dumps({"epoch_times_s": epoch_times, "test_accuracy": test_accuracies,
                      "first_step_unix_time": first_step_time,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    sys.stdout.flush()
