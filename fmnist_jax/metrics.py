"""What a run writes into its workdir: ``config.json``, ``metrics.jsonl``, ``summary.json``,
and with ``--tensorboard`` TensorBoard event files in ``tensorboard/``.

JSON files are written atomically (temporary file, then rename): a crash never leaves a
half-written one. ``metrics.jsonl`` gets one JSON object per epoch, flushed as it goes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from fmnist_jax.errors import UserError


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


def _clean(value):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _write_atomically(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    _write_atomically(path, json.dumps(_clean(obj), indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Writes ``records`` one per line, atomically (replacing the file)."""
    _write_atomically(path, "".join(json.dumps(_clean(r)) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class JsonlWriter:
    """Appends one JSON object per line and flushes each, so a crash loses no epoch."""

    def __init__(self, path: str | os.PathLike, append: bool = False):
        self._file = open(path, "a" if append else "w")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(_clean(record)) + "\n")
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
