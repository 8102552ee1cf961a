"""Fashion-MNIST (and MNIST, Kuzushiji-MNIST) on disk: find, download, verify and read the
four official IDX files; a data set of your own arrays (:meth:`Dataset.from_arrays`).

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

MNIST and Kuzushiji-MNIST (``--dataset=mnist``, ``kmnist``) are read the same way, from
``--data_dir`` or ``$XDG_CACHE_HOME/fmnist_jax/<name>`` (downloaded there if missing). Their
publishers give digests of the ``.gz`` archives only: an archive is checked against them, a
decompressed copy by its structure.
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
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fmnist_jax.errors import UserError
from fmnist_jax.files import atomic_open
from fmnist_jax.progress import progress_bar

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
    # The published archive's digest, "md5:..." or "sha256:...", for data sets whose payload
    # digest is not known: checked when the file is that archive (a decompressed copy is
    # checked by its structure alone).
    archive: str | None = None


@dataclasses.dataclass(frozen=True)
class DatasetFiles:
    """The four IDX files of a data set, and what is known of it: its name, classes and
    pixel statistics (None: computed from the training split), where it is published, and
    the folder name of its copies (the package cache's sub-folder; Debian's and Keras's
    ``datasets/<folder>`` for Fashion-MNIST)."""

    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile
    title: str = "Fashion-MNIST"
    key: str = "fashion_mnist"
    class_names: tuple[str, ...] = CLASS_NAMES
    mirrors: tuple[str, ...] = MIRRORS
    statistics: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    cache_subdir: str = ""  # Fashion-MNIST's files sit in the cache itself
    shared_folder: str | None = "fashion-mnist"  # Debian's and Keras's copies

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
    statistics=((72.9404 / 255.0,), (90.0212 / 255.0,)),
)


def _mnist_like(title: str, key: str, class_names: tuple[str, ...], mirrors: tuple[str, ...],
                archives: tuple[str, str, str, str]) -> DatasetFiles:
    """A data set in MNIST's four files (same names and counts), known by its archives'
    published digests."""
    files = [IdxFile(spec.name, spec.kind, spec.count, None, digest)
             for spec, digest in zip(FASHION_MNIST.all(), archives)]
    return DatasetFiles(*files, title=title, key=key, class_names=class_names,
                        mirrors=mirrors, cache_subdir=key, shared_folder=None)


MNIST = _mnist_like(
    "MNIST", "mnist", tuple(str(d) for d in range(10)),
    ("https://storage.googleapis.com/cvdf-datasets/mnist/",
     "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    ("sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
     "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
     "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
     "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"))
KMNIST = _mnist_like(
    "Kuzushiji-MNIST", "kmnist", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
    ("md5:bdb82020997e1d708af4cf47b453dcf7", "md5:e144d726b3acfaa3e44228e80efcd344",
     "md5:5c965bf0a639b31b8f53240b1b52f4d7", "md5:7320c461ea6c1c855c0b718fb2a4b134"))
IDX_DATASETS = {files.key: files for files in (FASHION_MNIST, MNIST, KMNIST)}


def idx_dataset(key: str) -> DatasetFiles:
    """The IDX data set named ``key`` (``--dataset``)."""
    if key not in IDX_DATASETS:
        raise UserError(f"--dataset={key} has no official IDX files known here (those known: "
                        f"{', '.join(IDX_DATASETS)}); a tfds data set needs --data_source=tfds")
    return IDX_DATASETS[key]


# The pixel statistics of Fashion-MNIST's 60,000 training images (72.94 and 90.02 of 255),
# in the units of DataSpec: pixel values divided by 255.
(PIXEL_MEAN,), (PIXEL_STD,) = FASHION_MNIST.statistics


class Split(NamedTuple):
    images: np.ndarray  # (N, H, W, C): uint8, or float32
    labels: np.ndarray  # int32 (N,)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a model and its inputs need to know of a data set; it travels with the run
    (``config.json``'s ``data``), so that predicting, evaluating and exporting take the
    same images and normalise them the same way. ``mean`` and ``std``: per channel, of the
    training images' pixel values divided by 255; ``pixels``: ``uint8`` (0-255) or
    ``float32`` (any range: the statistics follow it)."""

    image_shape: tuple[int, int, int] = IMAGE_SHAPE
    class_names: tuple[str, ...] = CLASS_NAMES
    mean: tuple[float, ...] = (PIXEL_MEAN,)
    std: tuple[float, ...] = (PIXEL_STD,)
    pixels: str = "uint8"
    name: str = "fashion_mnist"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict | None) -> DataSpec:
        """The spec of ``to_dict``; None (a run of a version before specs): Fashion-MNIST's."""
        if values is None:
            return cls()
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits as host arrays, with where they came from, and
    the pixel statistics to standardise them with (``None``: those of ``train``)."""

    train: Split
    validation: Split | None
    test: Split
    class_names: tuple[str, ...] = CLASS_NAMES
    source: str = ""
    statistics: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    name: str = "arrays"

    @classmethod
    def from_arrays(cls, x_train, y_train, x_test, y_test, *, validation_size: int = 5000,
                    class_names: Sequence[str] | None = None, name: str = "arrays"
                    ) -> Dataset:
        """A data set of your own: images ``(N, H, W)`` or ``(N, H, W, C)``, uint8 (0-255)
        or float (any range), and integer labels 0..K-1 (K from ``class_names``, else the
        largest label + 1). The first ``validation_size`` training images are held out
        for validation; the normalisation statistics come from the rest."""
        train = _split_of(x_train, y_train, "x_train", "y_train")
        test = _split_of(x_test, y_test, "x_test", "y_test")
        if train.images.shape[1:] != test.images.shape[1:]:
            raise UserError(f"x_train has images of shape {train.images.shape[1:]} and "
                            f"x_test of shape {test.images.shape[1:]}: they must be the same")
        if train.images.dtype != test.images.dtype:
            raise UserError(f"x_train is {train.images.dtype} and x_test {test.images.dtype}"
                            ": give both as uint8 or both as floats")
        k = max(int(train.labels.max(initial=0)), int(test.labels.max(initial=0))) + 1
        if class_names is None:
            class_names = tuple(str(i) for i in range(k))
        elif len(class_names) < k:
            raise UserError(f"the labels go up to {k - 1} but class_names has "
                            f"{len(class_names)} names")
        train, validation = split_validation(train, validation_size)
        return cls(train, validation, test, tuple(class_names), name=name)

    def spec(self) -> DataSpec:
        """The run's :class:`DataSpec` for this data."""
        images = self.train.images
        if images.ndim != 4:
            raise UserError(f"Dataset images must be (N, H, W, C), got shape {images.shape}; "
                            "Dataset.from_arrays takes (N, H, W) too")
        mean, std = self.statistics or pixel_statistics(images)
        return DataSpec(tuple(images.shape[1:]), tuple(self.class_names), tuple(mean),
                        tuple(std), "uint8" if images.dtype == np.uint8 else "float32",
                        self.name)


def pixel_statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``images / 255`` (float64 sums, in
    chunks: no float copy of the whole array)."""
    n = images.shape[0] * images.shape[1] * images.shape[2]
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    for start in range(0, len(images), 4096):
        chunk = images[start:start + 4096].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 1, 2))
        squares += np.square(chunk).sum(axis=(0, 1, 2))
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - np.square(mean), 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) if s > 0 else 1.0 for s in std)


def _split_of(images, labels, x_name: str, y_name: str) -> Split:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or min(images.shape[1:], default=0) < 1:
        raise UserError(f"{x_name} must hold images (N, H, W) or (N, H, W, C), got shape "
                        f"{images.shape}")
    if images.dtype != np.uint8:
        if not (np.issubdtype(images.dtype, np.integer) or
                np.issubdtype(images.dtype, np.floating)):
            raise UserError(f"{x_name} must be uint8 or float, got dtype {images.dtype}")
        images = images.astype(np.float32)
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{y_name} must be integer labels (N,) for the {len(images)} images "
                        f"of {x_name}, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise UserError(f"{y_name} must hold integer class indices 0..K-1 "
                            f"(got dtype {labels.dtype}); one-hot labels: pass argmax(-1)")
    if labels.size and labels.min() < 0:
        raise UserError(f"{y_name} has label {int(labels.min())}: labels are 0..K-1")
    return Split(images, labels.astype(np.int32))


# ----------------------------------------------------------------------------- reading

def _fix_hint(path: Path) -> str:
    return (f"delete {path} (it will be downloaded again) or replace it with the official "
            f"file")


def _read_payload(path: Path, spec: IdxFile | None = None) -> bytes:
    """The file's IDX payload (decompressed if it is gzipped, whatever its name); a file
    that is the published archive of ``spec`` is checked against its digest."""
    try:
        raw = path.read_bytes()
        if raw[:2] != b"\x1f\x8b":
            return raw
        if spec is not None and spec.archive:
            algorithm, expected = spec.archive.split(":")
            digest = hashlib.new(algorithm, raw).hexdigest()
            if digest != expected:
                raise UserError(f"{path} fails its checksum ({algorithm.upper()} of the "
                                f"archive is {digest[:16]}..., expected {expected[:16]}...): "
                                f"the file is corrupt or not the official release; "
                                f"{_fix_hint(path)}")
        return gzip.decompress(raw)
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
    return _checked(path, _read_payload(path, spec), spec)


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


def system_data_dirs(folder: str = "fashion-mnist") -> list[Path]:
    """``datasets/<folder>`` in each of ``$XDG_DATA_DIRS`` (default ``/usr/local/share``
    and ``/usr/share``): where Debian's ``dataset-fashion-mnist`` package puts the files."""
    dirs = os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share"
    return [Path(d) / "datasets" / folder for d in dirs.split(os.pathsep) if d]


def known_locations(files: DatasetFiles | None = None) -> list[Path]:
    """Where the files are looked for when no directory is given, in order."""
    files = files or FASHION_MNIST
    cache = cache_dir() / files.cache_subdir if files.cache_subdir else cache_dir()
    if files.shared_folder is None:
        return [cache]
    return [cache, *system_data_dirs(files.shared_folder),
            Path(os.path.expanduser("~")) / ".keras" / "datasets" / files.shared_folder]


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
    # FMNIST_DATA_DIR names Fashion-MNIST's directory, not another data set's
    explicit = data_dir or (os.environ.get("FMNIST_DATA_DIR")
                            if files.key == "fashion_mnist" else None)
    if explicit:
        directory = Path(explicit).expanduser()
        flag = "--data_dir" if data_dir else "FMNIST_DATA_DIR"
        if not directory.exists():
            raise UserError(f"{flag}={explicit} does not exist; point it at the directory "
                            f"holding the four {files.title} .gz files, or leave it unset to "
                            "use the cache")
        if not directory.is_dir():
            raise UserError(f"{flag}={explicit} is a file, not a directory")
        if _unreadable_dir(directory):
            raise UserError(f"{flag}={explicit} cannot be read (permission denied)")
        found = {f.name: _locate(directory, f) for f in files.all()}
        missing = [name + ".gz" for name, path in found.items() if path is None]
        if missing:
            raise UserError(f"{flag}={explicit} lacks {', '.join(missing)}; copy the missing "
                            f"file(s) there (from {files.mirrors[0]}), or leave {flag} unset to use "
                            "the cache and download")
        return _as_fields(files, found)
    locations = known_locations(files)
    for directory in locations:
        found = {f.name: _locate(directory, f) for f in files.all()}
        if all(found.values()):
            return _as_fields(files, found)
    if not download:
        raise UserError(_offline_message(files, "downloading is turned off"))
    return _as_fields(files, download_files(locations[0], files))


FILE_FIELDS = ("train_images", "train_labels", "test_images", "test_labels")


def _as_fields(files: DatasetFiles, found: dict[str, Path]) -> dict[str, Path]:
    return {field: found[getattr(files, field).name] for field in FILE_FIELDS}


def _offline_message(files: DatasetFiles, why: str) -> str:
    places = ", ".join(str(p) for p in known_locations(files))
    debian = " (on Debian/Ubuntu: apt install dataset-fashion-mnist)" \
        if files.key == "fashion_mnist" else ""
    return (f"{files.title} was not found and could not be downloaded ({why}). Provide it in "
            f"one of these ways: (1) download the four files "
            f"({', '.join(f.name + '.gz' for f in files.all())}) from {files.mirrors[0]} and "
            f"pass --data_dir=DIR or set FMNIST_DATA_DIR=DIR; (2) put them in one of: "
            f"{places}{debian}; (3) run again with internet access to download them into "
            f"{known_locations(files)[0]}.")


def _mirrors(files: DatasetFiles) -> list[str]:
    override = os.environ.get("FMNIST_MIRRORS")
    urls = override.replace(",", " ").split() if override else list(files.mirrors)
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
    errors = []
    for mirror in _mirrors(files):
        url = mirror + spec.name + ".gz"
        try:
            with atomic_open(target, "wb") as out, \
                    urllib.request.urlopen(url, timeout=30) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with progress_bar(total=total, unit="B", unit_scale=True,
                                  desc=target.name, leave=False) as bar:
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
                 files: DatasetFiles | None = None, download: bool = True, *,
                 dataset: str = "fashion_mnist") -> Dataset:
    """Loads a data set from its IDX files (``files``, else the one named ``dataset``:
    Fashion-MNIST by default, ``mnist``, ``kmnist``) into host memory, split three ways."""
    files = files or idx_dataset(dataset)
    train, test, directory = load_arrays(data_dir, files, download)
    train, validation = split_validation(train, validation_size)
    return Dataset(train, validation, test, files.class_names, str(directory),
                   statistics=files.statistics, name=files.key)
