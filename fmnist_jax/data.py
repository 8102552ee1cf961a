"""Fashion-MNIST on disk: find, download, verify and read the four official IDX files.

No TensorFlow: the files are parsed with numpy. Every file is checked by the SHA-256 of its
*decompressed* payload (so re-gzipped copies, like Debian's, pass), by its IDX magic number,
its dimensions and its example count; labels must lie in 0-9. Anything wrong raises a
:class:`~fmnist_jax.errors.UserError` that names the file, the fault and the fix.

Where the files are looked for, in order (the first directory holding all four wins):

1. ``--data_dir`` or the ``FMNIST_DATA_DIR`` environment variable (only there, if given);
2. the package cache, ``$XDG_CACHE_HOME/fmnist_jax`` (default ``~/.cache/fmnist_jax``);
3. Debian's ``dataset-fashion-mnist`` package, ``/usr/share/datasets/fashion-mnist`` (the
   ``datasets/fashion-mnist`` folder of each of ``$XDG_DATA_DIRS``);
4. the Keras cache, ``~/.keras/datasets/fashion-mnist``;
5. else they are downloaded into the package cache, atomically (temporary file, verify,
   rename), so an interrupted download never leaves a partial file behind.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fmnist_jax.errors import UserError
from fmnist_jax.files import atomic_open

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28, 1)

# Official release, http only; the Keras mirror serves the same bytes over https.
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
)


@dataclasses.dataclass(frozen=True)
class IdxFile:
    """One IDX file of a data set: its name, what it holds and the digest of its payload."""

    name: str  # without ".gz"
    kind: str  # "images" or "labels"
    count: int
    sha256: str | None  # of the decompressed payload; None skips the check


@dataclasses.dataclass(frozen=True)
class DatasetFiles:
    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile

    def all(self) -> tuple[IdxFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


FASHION_MNIST = DatasetFiles(
    IdxFile("train-images-idx3-ubyte", "images", 60_000,
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    IdxFile("train-labels-idx1-ubyte", "labels", 60_000,
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    IdxFile("t10k-images-idx3-ubyte", "images", 10_000,
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    IdxFile("t10k-labels-idx1-ubyte", "labels", 10_000,
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
)


class Split(NamedTuple):
    images: np.ndarray  # uint8 (N, 28, 28, 1)
    labels: np.ndarray  # int32 (N,)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits as host arrays, with where they came from."""

    train: Split
    validation: Split | None
    test: Split
    class_names: tuple[str, ...] = CLASS_NAMES
    source: str = ""


# ----------------------------------------------------------------------------- reading

def _fix_hint(path: Path) -> str:
    return (f"delete {path} (it will be downloaded again) or replace it with the official "
            f"file from {MIRRORS[0]}")


def _read_payload(path: Path) -> bytes:
    """The file's IDX payload (decompressed if it is gzipped, whatever its name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except EOFError:
        raise UserError(f"{path} is truncated (the gzip stream ends early); {_fix_hint(path)}")
    except (gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"{path} is not a valid gzip file ({e}); {_fix_hint(path)}")
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied); fix its permissions")
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e})")


def read_idx(path: str | os.PathLike, spec: IdxFile) -> np.ndarray:
    """Reads and checks one IDX file (gzipped or not).

    Returns images as uint8 ``(N, 28, 28, 1)`` or labels as int32 ``(N,)``.
    """
    path = Path(path)
    return _checked(path, _read_payload(path), spec)


def _checked(path: Path, data: bytes, spec: IdxFile) -> np.ndarray:
    """The array of an IDX payload, after every check (``path`` names it in errors)."""
    ndim = 3 if spec.kind == "images" else 1
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"{path} is too short to be an IDX file ({len(data)} bytes); "
                        f"{_fix_hint(path)}")
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x0800 + ndim:
        raise UserError(f"{path} has IDX magic number {magic:#010x}, expected "
                        f"{0x0800 + ndim:#010x} (uint8 {spec.kind}); {_fix_hint(path)}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected_dims = (spec.count, 28, 28) if spec.kind == "images" else (spec.count,)
    if dims != expected_dims:
        raise UserError(f"{path} has dimensions {dims}, expected {expected_dims}; "
                        f"{_fix_hint(path)}")
    header = 4 + 4 * ndim
    size = int(np.prod(dims))
    if len(data) != header + size:
        raise UserError(f"{path} holds {len(data) - header} bytes of data, expected {size} "
                        f"(truncated or padded); {_fix_hint(path)}")
    array = np.frombuffer(data, np.uint8, offset=header).reshape(dims)
    if spec.kind == "labels" and array.max(initial=0) >= NUM_CLASSES:
        raise UserError(f"{path} has label {int(array.max())}, outside 0-{NUM_CLASSES - 1}; "
                        f"{_fix_hint(path)}")
    if spec.sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != spec.sha256:
            raise UserError(f"{path} fails its checksum (SHA-256 of the payload is "
                            f"{digest[:16]}..., expected {spec.sha256[:16]}...): the file is "
                            f"corrupt or not the official release; {_fix_hint(path)}")
    if spec.kind == "labels":
        return array.astype(np.int32)
    return array.reshape(*dims, 1).copy()


# --------------------------------------------------------------------------- finding

def cache_dir() -> Path:
    """The package's data cache, following ``XDG_CACHE_HOME``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fmnist_jax"


def system_data_dirs() -> list[Path]:
    """``datasets/fashion-mnist`` in each of ``$XDG_DATA_DIRS`` (default ``/usr/local/share``
    and ``/usr/share``): where Debian's ``dataset-fashion-mnist`` package puts the files."""
    dirs = os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share"
    return [Path(d) / "datasets" / "fashion-mnist" for d in dirs.split(os.pathsep) if d]


def known_locations() -> list[Path]:
    """Where the files are looked for when no directory is given, in order."""
    return [
        cache_dir(),
        *system_data_dirs(),
        Path(os.path.expanduser("~")) / ".keras" / "datasets" / "fashion-mnist",
    ]


def _locate(directory: Path, spec: IdxFile) -> Path | None:
    for name in (spec.name + ".gz", spec.name):
        if (directory / name).is_file():
            return directory / name
    return None


def _unreadable_dir(directory: Path) -> bool:
    return directory.is_dir() and not os.access(directory, os.R_OK | os.X_OK)


def find_files(data_dir: str | None = None, files: DatasetFiles | None = None,
               download: bool = True) -> dict[str, Path]:
    """Finds (or downloads) the four files and returns their paths, keyed by field name.

    ``files`` describes the data set (default: :data:`FASHION_MNIST`, read when called).
    """
    files = files or FASHION_MNIST
    explicit = data_dir or os.environ.get("FMNIST_DATA_DIR")
    if explicit:
        directory = Path(explicit).expanduser()
        flag = "--data_dir" if data_dir else "FMNIST_DATA_DIR"
        if not directory.exists():
            raise UserError(f"{flag}={explicit} does not exist; point it at the directory "
                            "holding the four Fashion-MNIST .gz files, or leave it unset to "
                            "use the cache")
        if not directory.is_dir():
            raise UserError(f"{flag}={explicit} is a file, not a directory")
        if _unreadable_dir(directory):
            raise UserError(f"{flag}={explicit} cannot be read (permission denied)")
        found = {f.name: _locate(directory, f) for f in files.all()}
        missing = [name + ".gz" for name, path in found.items() if path is None]
        if missing:
            raise UserError(f"{flag}={explicit} lacks {', '.join(missing)}; copy the missing "
                            f"file(s) there (from {MIRRORS[0]}), or leave {flag} unset to use "
                            "the cache and download")
        return _as_fields(files, found)
    for directory in known_locations():
        found = {f.name: _locate(directory, f) for f in files.all()}
        if all(found.values()):
            return _as_fields(files, found)
    if not download:
        raise UserError(_offline_message(files, "downloading is turned off"))
    return _as_fields(files, download_files(cache_dir(), files))


def _as_fields(files: DatasetFiles, found: dict[str, Path]) -> dict[str, Path]:
    return {field.name: found[getattr(files, field.name).name]
            for field in dataclasses.fields(files)}


def _offline_message(files: DatasetFiles, why: str) -> str:
    places = ", ".join(str(p) for p in known_locations())
    return (f"Fashion-MNIST was not found and could not be downloaded ({why}). Provide it in "
            f"one of these ways: (1) download the four files "
            f"({', '.join(f.name + '.gz' for f in files.all())}) from {MIRRORS[0]} and pass "
            f"--data_dir=DIR or set FMNIST_DATA_DIR=DIR; (2) put them in one of: {places} "
            f"(on Debian/Ubuntu: apt install dataset-fashion-mnist); (3) run again with "
            f"internet access to download them into {cache_dir()}.")


def _mirrors() -> list[str]:
    override = os.environ.get("FMNIST_MIRRORS")
    urls = override.replace(",", " ").split() if override else list(MIRRORS)
    return [u if u.endswith("/") else u + "/" for u in urls]


def download_files(directory: Path, files: DatasetFiles | None = None) -> dict[str, Path]:
    """Downloads whatever of the four files ``directory`` lacks, verifying each one.

    Each file is written to a temporary name in the same directory, checked, then renamed
    into place: an interrupted or corrupt download leaves nothing under the final name.
    """
    files = files or FASHION_MNIST
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data cache {directory} ({e.strerror or e}); set "
                        "XDG_CACHE_HOME or pass --data_dir")
    paths = {}
    for spec in files.all():
        target = directory / (spec.name + ".gz")
        if not target.is_file():
            _download_one(spec, target, files)
        paths[spec.name] = target
    return paths


def _download_one(spec: IdxFile, target: Path, files: DatasetFiles) -> None:
    from tqdm.auto import tqdm

    errors = []
    for mirror in _mirrors():
        url = mirror + spec.name + ".gz"
        try:
            with atomic_open(target, "wb") as out, \
                    urllib.request.urlopen(url, timeout=30) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=target.name,
                          leave=False) as bar:
                    while chunk := resp.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
                if total is not None and out.tell() != total:
                    raise OSError(f"connection closed after {out.tell()} of {total} bytes")
                out.flush()
                read_idx(out.name, spec)  # verify before it gets its name
            return
        except (OSError, http.client.HTTPException, UserError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
    raise UserError(_offline_message(files, "; ".join(errors)))


# --------------------------------------------------------------------------- loading

def load_arrays(data_dir: str | None = None, files: DatasetFiles | None = None,
                download: bool = True) -> tuple[Split, Split, Path]:
    """Returns the full (train, test) splits and the directory they were read from."""
    files = files or FASHION_MNIST
    paths = find_files(data_dir, files, download)
    train = Split(read_idx(paths["train_images"], files.train_images),
                  read_idx(paths["train_labels"], files.train_labels))
    test = Split(read_idx(paths["test_images"], files.test_images),
                 read_idx(paths["test_labels"], files.test_labels))
    return train, test, paths["train_images"].parent


def split_validation(train: Split, validation_size: int) -> tuple[Split, Split | None]:
    """Holds out the *first* ``validation_size`` training images (as the seed notebooks)."""
    n = len(train.labels)
    if not 0 <= validation_size < n:
        raise UserError(f"--validation_size={validation_size} must be in [0, {n}) "
                        f"(the training set has {n} images)")
    if validation_size == 0:
        return train, None
    return (Split(train.images[validation_size:], train.labels[validation_size:]),
            Split(train.images[:validation_size], train.labels[:validation_size]))


def load_dataset(data_dir: str | None = None, validation_size: int = 5000,
                 files: DatasetFiles | None = None, download: bool = True) -> Dataset:
    """Loads Fashion-MNIST from the IDX files into host memory, split three ways."""
    train, test, directory = load_arrays(data_dir, files, download)
    train, validation = split_validation(train, validation_size)
    return Dataset(train, validation, test, CLASS_NAMES, str(directory))
