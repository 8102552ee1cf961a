"""The IDX reader, file discovery, downloading and the validation split."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import LocalMirror, idx_bytes, write_idx_set

from fmnist_jax import data
from fmnist_jax.data import IdxFile, Split, read_idx, split_validation
from fmnist_jax.errors import UserError


# ------------------------------------------------------------------ reading one file

def test_reads_valid_files(idx_dir):
    directory, files = idx_dir
    images = read_idx(directory / "train-images-idx3-ubyte.gz", files.train_images)
    labels = read_idx(directory / "train-labels-idx1-ubyte.gz", files.train_labels)
    assert images.shape == (200, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (200,) and labels.dtype == np.int32
    assert sorted(np.bincount(labels)) == [20] * 10


def test_reads_uncompressed_files(tmp_path):
    files = write_idx_set(tmp_path, gz=False)
    labels = read_idx(tmp_path / "t10k-labels-idx1-ubyte", files.test_labels)
    assert labels.shape == (100,)


def _spec(kind="labels", count=5, sha=None):
    return IdxFile("x", kind, count, sha)


def _write(tmp_path, payload: bytes, gz=True) -> Path:
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


LABELS = np.array([1, 2, 3, 4, 5], np.uint8)


@pytest.mark.parametrize("case, make, message", [
    ("truncated gzip", lambda p: gzip.compress(idx_bytes(LABELS))[:-12], "is truncated"),
    ("corrupt gzip", lambda p: b"\x1f\x8b" + b"garbage" * 10, "not a valid gzip file"),
    ("wrong magic", lambda p: gzip.compress(b"\x00\x00\x08\x03" + idx_bytes(LABELS)[4:]),
     "magic number 0x00000803"),
    ("wrong count", lambda p: gzip.compress(idx_bytes(np.arange(4, dtype=np.uint8))),
     "dimensions (4,), expected (5,)"),
    ("short payload", lambda p: gzip.compress(idx_bytes(LABELS)[:-1]), "holds 4 bytes"),
    ("label out of range", lambda p: gzip.compress(idx_bytes(np.array([1, 2, 3, 4, 12]))),
     "label 12, outside 0-9"),
    ("too short", lambda p: gzip.compress(b"\x00\x00"), "too short to be an IDX file"),
])
def test_rejects_bad_files(tmp_path, case, make, message):
    path = tmp_path / "x.gz"
    path.write_bytes(make(path))
    with pytest.raises(UserError) as e:
        read_idx(path, _spec())
    assert message in str(e.value) and str(path) in str(e.value)
    assert "delete" in str(e.value)  # says how to fix it


def test_rejects_wrong_image_dimensions(tmp_path):
    path = _write(tmp_path, idx_bytes(np.zeros((5, 28, 27), np.uint8)))
    with pytest.raises(UserError, match=r"dimensions \(5, 28, 27\), expected \(5, 28, 28\)"):
        read_idx(path, _spec("images"))


def test_checksum_is_of_the_payload_not_the_gzip(tmp_path):
    import hashlib
    payload = idx_bytes(LABELS)
    spec = _spec(sha=hashlib.sha256(payload).hexdigest())
    # Two different gzip containers (like Debian's rewritten headers) of the same payload.
    a = tmp_path / "a.gz"
    a.write_bytes(gzip.compress(payload, mtime=0))
    b = tmp_path / "b.gz"
    b.write_bytes(gzip.compress(payload, mtime=123456, compresslevel=1))
    assert a.read_bytes() != b.read_bytes()
    np.testing.assert_array_equal(read_idx(a, spec), read_idx(b, spec))
    with pytest.raises(UserError, match="fails its checksum"):
        read_idx(a, _spec(sha="0" * 64))


def test_unreadable_file(tmp_path, monkeypatch):
    path = _write(tmp_path, idx_bytes(LABELS))

    def denied(self):  # what chmod 0 does, for root too
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(UserError, match=f"{path} cannot be read \\(permission denied\\)"):
        read_idx(path, _spec())


# ------------------------------------------------------------------ the real files

def test_real_data(real_data_dir):
    ds = data.load_dataset(str(real_data_dir), validation_size=5000)
    assert ds.train.images.shape == (55000, 28, 28, 1)
    assert ds.validation.images.shape == (5000, 28, 28, 1)
    assert ds.test.images.shape == (10000, 28, 28, 1)
    # The README.txt of the data: first labels, per-class counts, pixel statistics.
    assert ds.validation.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert ds.test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    full = np.concatenate([ds.validation.images, ds.train.images])
    assert full.mean() == pytest.approx(72.9404, abs=1e-4)
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"


def test_validation_split_is_the_first_images():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    train, val = split_validation(Split(images, np.arange(10, dtype=np.int32)), 3)
    assert val.labels.tolist() == [0, 1, 2] and train.labels.tolist() == list(range(3, 10))
    train, val = split_validation(Split(images, np.arange(10, dtype=np.int32)), 0)
    assert val is None and len(train.labels) == 10
    with pytest.raises(UserError, match=r"--validation_size=10 must be in \[0, 10\)"):
        split_validation(Split(images, np.arange(10, dtype=np.int32)), 10)


def test_a_runs_splits_are_read_again_as_it_read_them(use_synthetic):
    from fmnist_jax import Config
    from fmnist_jax.input_pipeline import load_split

    data_set = data.load_dataset(validation_size=500)
    validation = load_split(Config(validation_size=500), "validation")
    assert np.array_equal(validation.images, data_set.validation.images)
    assert np.array_equal(validation.labels, data_set.validation.labels)
    test = load_split(Config(validation_size=500), "test")
    assert np.array_equal(test.images, data_set.test.images) and len(test.labels) == 1000
    assert load_split(Config(validation_size=0), "validation") is None
    with pytest.raises(ValueError, match="'test' or 'validation'"):
        load_split(Config(), "train")


# ------------------------------------------------------------------ discovery order

@pytest.fixture
def places(tmp_path, monkeypatch):
    """Isolated cache, Debian and Keras locations; no env override; no network."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    monkeypatch.setenv("FMNIST_MIRRORS", "http://127.0.0.1:9/")  # nothing listens there
    monkeypatch.setenv("XDG_DATA_DIRS", f"{tmp_path / 'share'}{os.pathsep}{tmp_path / 'usr'}")
    debian = tmp_path / "share" / "datasets" / "fashion-mnist"
    return {"cache": tmp_path / "xdg" / "fmnist_jax", "debian": debian,
            "keras": home / ".keras" / "datasets" / "fashion-mnist",
            "explicit": tmp_path / "explicit"}


def test_discovery_order(places, monkeypatch):
    for name in ("keras", "debian", "cache", "explicit"):
        files = write_idx_set(places[name])
        assert data.find_files(None, files)["train_images"].parent == (
            places["cache"] if name == "explicit" else places[name])
    # The explicit directory wins over everything, as flag or environment variable.
    files = write_idx_set(places["explicit"])
    assert data.find_files(str(places["explicit"]), files)["test_labels"].parent == \
        places["explicit"]
    monkeypatch.setenv("FMNIST_DATA_DIR", str(places["explicit"]))
    assert data.find_files(None, files)["test_labels"].parent == places["explicit"]


def test_known_locations_follow_xdg(places):
    assert data.known_locations() == [places["cache"], places["debian"],
                                      places["debian"].parents[2] / "usr/datasets/fashion-mnist",
                                      places["keras"]]


def test_explicit_dir_missing_a_file(places):
    files = write_idx_set(places["explicit"])
    (places["explicit"] / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match=r"--data_dir=.* lacks t10k-labels-idx1-ubyte.gz"):
        data.find_files(str(places["explicit"]), files)


def test_explicit_dir_does_not_exist(places):
    with pytest.raises(UserError, match="does not exist"):
        data.find_files(str(places["explicit"] / "nope"))


def test_offline_with_no_copy_lists_the_ways(places):
    with pytest.raises(UserError) as e:
        data.find_files(None)
    text = str(e.value)
    for way in ("--data_dir", "FMNIST_DATA_DIR", "apt install dataset-fashion-mnist",
                str(places["cache"]), "127.0.0.1:9"):
        assert way in text
    assert not any(places["cache"].glob("*.gz"))


# ------------------------------------------------------------------ downloading

class _HalfMirror(LocalMirror):
    """Sends only the first half of each file (with the full Content-Length)."""

    def send(self, body, outputfile):
        outputfile.write(body[: len(body) // 2])


def test_download_into_cache(places, tmp_path, monkeypatch):
    files = write_idx_set(tmp_path / "mirror")
    server = LocalMirror(tmp_path / "mirror")
    monkeypatch.setenv("FMNIST_MIRRORS", f"http://127.0.0.1:9/ {server.url}")
    old = os.umask(0o022)
    try:
        found = data.find_files(None, files)
    finally:
        os.umask(old)
        server.close()
    assert found["train_images"] == places["cache"] / "train-images-idx3-ubyte.gz"
    assert sorted(p.name for p in places["cache"].iterdir()) == sorted(
        f.name + ".gz" for f in files.all())  # no temporary files left
    for p in places["cache"].iterdir():  # readable by all, like any downloaded file
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_interrupted_download_leaves_nothing(places, tmp_path, monkeypatch):
    files = write_idx_set(tmp_path / "mirror")
    server = _HalfMirror(tmp_path / "mirror")
    monkeypatch.setenv("FMNIST_MIRRORS", server.url)
    try:
        with pytest.raises(UserError, match="could not be downloaded"):
            data.find_files(None, files)
    finally:
        server.close()
    assert list(places["cache"].iterdir()) == []


def test_download_with_wrong_checksum_leaves_nothing(places, tmp_path, monkeypatch):
    files = write_idx_set(tmp_path / "mirror")
    bad = data.DatasetFiles(*(f.__class__(f.name, f.kind, f.count, "0" * 64)
                              for f in files.all()))
    server = LocalMirror(tmp_path / "mirror")
    monkeypatch.setenv("FMNIST_MIRRORS", server.url)
    try:
        with pytest.raises(UserError, match="fails its checksum"):
            data.find_files(None, bad)
    finally:
        server.close()
    assert list(places["cache"].iterdir()) == []
