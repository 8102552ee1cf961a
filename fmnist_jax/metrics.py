"""What a run measures and writes into its workdir: loss and accuracy from logits,
``config.json``, ``metrics.jsonl``, ``summary.json``, and with ``--tensorboard`` TensorBoard
event files in ``tensorboard/``.

Every evaluation (validation and test during training, ``fmnist-evaluate``, ``predict``)
computes its loss and accuracy with :func:`classification`, from float32 logits, in float64
on the host: the same logits give the same numbers everywhere, to the last digit.

JSON files are written atomically (:mod:`fmnist_jax.files`): a crash never leaves a
half-written one. ``metrics.jsonl`` gets one JSON object per epoch, flushed as it goes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import numpy as np

from fmnist_jax.errors import UserError
from fmnist_jax.files import clean


def classification(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Mean softmax cross-entropy (the negative log-likelihood of the labels, whatever loss
    training used), accuracy and count, from logits ``(N, C)`` and integer labels ``(N,)``.

    Computed here in float64 rather than with ``nnx.metrics.Accuracy``/``Average``, which
    accumulate in float32: for example, 9,303 right of 10,000 comes out of ``Accuracy`` as
    0.9302999973297119, where every tool must print the same 0.9303.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    top = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    nll = log_norm - logits[np.arange(len(labels)), labels]
    return {"loss": float(nll.mean()), "accuracy": float((logits.argmax(-1) == labels).mean()),
            "count": int(len(labels))}


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """Creates ``workdir`` if needed and checks it can be written."""
    path = Path(workdir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--workdir={workdir} is a file; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir={workdir} cannot be created ({e.strerror or e})")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--workdir={workdir} is not writable; choose another directory")
    return path


def remove_if_unused(path: Path) -> None:
    """Removes the workdir ``path`` if it holds nothing but the run's lock: a run that
    failed before writing anything leaves no empty folder behind."""
    with contextlib.suppress(OSError):
        if {p.name for p in path.iterdir()} <= {".lock"}:
            (path / ".lock").unlink(missing_ok=True)
            path.rmdir()


class JsonlWriter:
    """Appends one JSON object per line and flushes each, so a crash loses no epoch."""

    def __init__(self, path: str | os.PathLike, append: bool = False):
        self._file = open(path, "a" if append else "w")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(clean(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """The per-epoch records as TensorBoard scalars, by epoch: ``loss/train``,
    ``loss/val``, ``accuracy/test``, ... and ``run/learning_rate``, ``run/images_per_s``.

    Written with tensorboardX, which needs no TensorFlow (``pip install tensorboardX``, or
    the ``tensorboard`` extra). View with ``tensorboard --logdir WORKDIR/tensorboard``.
    """

    def __init__(self, logdir: str | os.PathLike):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs tensorboardX: pip install tensorboardX "
                            "(or pip install 'fmnist_jax[tensorboard]')") from None
        self._writer = SummaryWriter(str(logdir))

    @staticmethod
    def tag(key: str) -> str:
        for split in ("train", "val", "test"):
            for metric in ("loss", "accuracy"):
                if key == f"{split}_{metric}":
                    return f"{metric}/{split}"
        return f"run/{key}"

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and \
                    not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(self.tag(key), value, record["epoch"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
