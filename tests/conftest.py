"""Shared fixtures: the real data when it is here, small generated IDX files always."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from fmnist_jax.data import FASHION_MNIST, DatasetFiles, IdxFile, Split

REPO = Path(__file__).resolve().parents[1]


def find_real_data() -> Path | None:
    """The official files: $FMNIST_DATA_DIR, the copy beside the checkout, or Debian's."""
    candidates = [os.environ.get("FMNIST_DATA_DIR"), REPO.parent / "shared/data/fashion_mnist",
                  "/usr/share/datasets/fashion-mnist"]
    for c in candidates:
        if c and all((Path(c) / (f.name + ".gz")).is_file() for f in FASHION_MNIST.all()):
            return Path(c)
    return None


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    path = find_real_data()
    if path is None:
        pytest.skip("the real Fashion-MNIST files are not here (set FMNIST_DATA_DIR)")
    return path


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
