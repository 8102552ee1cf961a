"""Shared fixtures: the real data when it is here, small generated IDX files always."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from fmnist_jax.data import FASHION_MNIST, DatasetFiles, IdxFile, Split

REPO = Path(__file__).resolve().parents[1]
# The suite is written for the CPU (8 simulated devices, bitwise comparisons); on a GPU or
# TPU host it still runs there unless JAX_PLATFORMS says otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def find_real_data() -> Path | None:
    """The official files: $FMNIST_DATA_DIR, the copy beside the checkout, or Debian's."""
    candidates = [os.environ.get("FMNIST_DATA_DIR"), REPO.parent / "shared/data/fashion_mnist",
                  "/usr/share/datasets/fashion-mnist"]
    for c in candidates:
        if c and all((Path(c) / (f.name + ".gz")).is_file() for f in FASHION_MNIST.all()):
            return Path(c)
    return None


REAL_DATA = find_real_data()
# Hermetic: whatever the machine holds (the data in its known places, Debian's package, a
# filled cache of data or compiled programs, a HOME) stays out of the tests. Every place
# the library looks for data or keeps a cache points at this run's own empty folders, for
# this process and the commands it starts; a test that wants the real data asks for it
# (real_data_dir) and passes it explicitly.
# (Done when pytest starts, not on import: scripts that import this module change nothing.)
SANDBOX = Path(tempfile.gettempdir()) / f"fmnist_jax-tests-{os.getpid()}"


def pytest_configure(config):
    (SANDBOX / "home").mkdir(parents=True, exist_ok=True)
    os.environ.pop("FMNIST_DATA_DIR", None)
    os.environ.update({"HOME": str(SANDBOX / "home"), "XDG_CACHE_HOME": str(SANDBOX / "cache"),
                       "XDG_DATA_DIRS": str(SANDBOX / "share")})


def pytest_unconfigure(config):
    shutil.rmtree(SANDBOX, ignore_errors=True)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if REAL_DATA is None:
        pytest.skip("the real Fashion-MNIST files are not here (set FMNIST_DATA_DIR)")
    return REAL_DATA


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX payload for a uint8 array (images (N, 28, 28) or labels (N,))."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images: class k is a bright horizontal band at rows 2k..2k+7."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k: 2 * k + 8, :] += 150
    return images, labels.astype(np.uint8)


def write_idx_set(directory: Path, n_train: int = 200, n_test: int = 100,
                  gz: bool = True) -> DatasetFiles:
    """Writes a small, valid four-file IDX set and returns its spec (with real digests)."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = []
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = make_images(n, seed)
        for kind, array, idx in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}-idx{idx}-ubyte"
            payload = idx_bytes(array)
            path = directory / (name + (".gz" if gz else ""))
            path.write_bytes(gzip.compress(payload) if gz else payload)
            specs.append(IdxFile(name, kind, n, hashlib.sha256(payload).hexdigest()))
    return DatasetFiles(*specs)


# The generated stand-in for Fashion-MNIST that subprocess tests train on (tests/synthetic.py):
# 3,000 training images (the first 500 are the validation split) and 1,000 test images.
SYNTHETIC_TRAIN, SYNTHETIC_TEST, SYNTHETIC_VAL = 3000, 1000, 500


def write_synthetic_set(directory: Path) -> Path:
    """A full four-file set of learnable images, with the ``spec.json`` that
    ``tests/synthetic.py`` reads."""
    files = write_idx_set(directory, SYNTHETIC_TRAIN, SYNTHETIC_TEST)
    (directory / "spec.json").write_text(json.dumps(
        [dataclasses.asdict(f) for f in files.all()]))
    return directory


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return write_synthetic_set(tmp_path_factory.mktemp("synthetic"))


def synthetic_cmd(data_dir: Path, module: str, *args) -> list[str]:
    """The command line that runs ``python -m module args`` on the generated set."""
    return [sys.executable, str(REPO / "tests" / "synthetic.py"), str(data_dir), module,
            *map(str, args)]


def run_synthetic(data_dir: Path, module: str, *args, env=None, timeout=300):
    return subprocess.run(synthetic_cmd(data_dir, module, *args), capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def read_one_line_then_close(cmd: list[str], timeout=300) -> tuple[str, int, str]:
    """``cmd | head -1``: its first line of output, then its stdout closed; the line, its
    exit status and its stderr."""
    proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    return line, proc.wait(timeout=timeout), err


@pytest.fixture
def use_synthetic(synthetic_dir, monkeypatch) -> Path:
    """In this process: the generated set in place of Fashion-MNIST."""
    from fmnist_jax import data

    files = dataclasses.replace(data.FASHION_MNIST, **dict(zip(data.FILE_FIELDS, (
        IdxFile(**f) for f in json.loads((synthetic_dir / "spec.json").read_text())))))
    monkeypatch.setattr(data, "FASHION_MNIST", files)
    monkeypatch.setitem(data.IDX_DATASETS, "fashion_mnist", files)
    monkeypatch.setenv("FMNIST_DATA_DIR", str(synthetic_dir))
    return synthetic_dir


@pytest.fixture
def idx_dir(tmp_path) -> tuple[Path, DatasetFiles]:
    return tmp_path / "idx", write_idx_set(tmp_path / "idx")


def tiny_dataset(n_train: int = 512, n_val: int = 128, n_test: int = 256):
    """A small in-memory Dataset of learnable synthetic images."""
    from fmnist_jax.data import Dataset

    def split(n, seed):
        images, labels = make_images(n, seed)
        return Split(images[..., None], labels.astype(np.int32))

    return Dataset(split(n_train, 0), split(n_val, 1), split(n_test, 2), source="synthetic")


class LocalMirror:
    """Serves ``directory`` on 127.0.0.1 as a download mirror (``url``).

    ``send(body, outputfile)`` writes a file's bytes to the client: override it to cut or
    stall a download.
    """

    def __init__(self, directory: Path):
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(directory), **k)

            def log_message(self, *args):
                pass

            def copyfile(self, source, outputfile):
                mirror.send(source.read(), outputfile)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def send(self, body: bytes, outputfile) -> None:
        outputfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
