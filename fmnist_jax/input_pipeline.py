"""Getting batches to the step functions: device-resident (default) or streamed from tfds.

Both pipelines feed the same jitted scans of :mod:`fmnist_jax.steps`, ``steps_per_dispatch``
steps per host call, in the same order semantics (a fresh permutation every epoch, full
batches only), and share one interface: ``train_epoch(state, epoch, steps, start_step)``
yields ``(state, per-step metrics, num_steps)`` after each dispatch,
``evaluate(variables, split, steps)`` returns the logits of every image of a split on the
host, and ``split(name)`` its images and labels.

- :class:`DeviceResident`: each split lives on the device as uint8 (55,000 training images
  are 43 MB). Every epoch draws a fresh permutation on the host (numpy, far cheaper than
  ``jax.random.permutation``'s sort on XLA:CPU; figures in experiments/README.md), sends
  the 220 KB of indices, and runs ``steps_per_dispatch`` steps per host call inside a
  jitted ``lax.scan`` that gathers its batches on the device, so the host is out of the
  loop.
- :class:`Streamed`: tfds's ``fashion_mnist`` through ``tfds.data_source`` (random-access
  ArrayRecord files; no TensorFlow needed once prepared) and Grain (``MapDataset``: shuffle
  reseeded per epoch, batches, per-process sharding, reading in threads ahead of the device),
  as tfds documents for JAX.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Protocol

import jax
import numpy as np

from fmnist_jax.data import (CLASS_NAMES, IDX_DATASETS, IMAGE_SHAPE, DataSpec, Split,
                             find_files, idx_dataset, load_arrays, pixel_statistics,
                             split_validation)
from fmnist_jax.errors import UserError
from fmnist_jax.parallel import Devices, to_host
from fmnist_jax.steps import Steps, TrainState


class Pipeline(Protocol):
    """What the training loop needs of a data pipeline; both below are one."""

    steps_per_epoch: int
    has_validation: bool

    def train_epoch(self, state: TrainState, epoch: int, steps: Steps, start_step: int = 0
                    ) -> Iterator[tuple[TrainState, dict, int]]:
        """Yields ``(state, per-step metrics, steps run)`` after each dispatch of the epoch,
        from ``start_step`` on."""

    def evaluate(self, variables: dict, split: str, steps: Steps, monitor: bool = False
                 ) -> np.ndarray:
        """The logits of every image of ``split``, in its order, on the host."""

    def split(self, name: str) -> Split:
        """The images and labels of an evaluation split, on the host."""

    def train_sample(self, n: int) -> np.ndarray:
        """The first ``n`` training images (after the validation split), on the host."""


def batched(images: np.ndarray, batch_size: int) -> np.ndarray:
    """``(batches, batch_size, ...)`` images, the last batch padded with black images."""
    n = len(images)
    batches = -(-n // batch_size)
    pad = np.zeros((batches * batch_size - n, *images.shape[1:]), images.dtype)
    return np.concatenate([images, pad]).reshape(batches, batch_size, *images.shape[1:])


def dispatch_steps(steps_per_epoch: int, requested: int = 0, near: int = 100) -> int:
    """Steps per dispatch: ``requested`` when given (``--steps_per_dispatch``), else the
    divisor of ``steps_per_epoch`` nearest to ``near`` (between half and ten times it), so
    every dispatch of an epoch has the same length and the scan compiles once; ``near``
    when there is none (a shorter last dispatch compiles again)."""
    if requested:
        return requested
    divisors = [d for d in range(max(1, near // 2), min(steps_per_epoch, 10 * near) + 1)
                if steps_per_epoch % d == 0]
    return min(divisors, key=lambda d: abs(np.log(d / near))) if divisors else near


def unbatched(logits, n: int | None) -> np.ndarray:
    """The logits of :func:`batched` images on the host, ``(n, classes)``, padding dropped
    (``n`` None: all of them)."""
    logits = to_host(logits)
    return logits.reshape(-1, logits.shape[-1])[:n]


def check_batch_size(batch_size: int, num_train: int, devices: Devices) -> None:
    if not 0 < batch_size <= num_train:
        raise UserError(f"--batch_size={batch_size} must be between 1 and the {num_train} "
                        "training images")
    devices.check_batch_size(batch_size)


def per_device_multiple(eval_batch_size: int, devices: Devices) -> int:
    """Evaluation batches are padded anyway: round them up to split over the devices."""
    return -(-eval_batch_size // devices.count) * devices.count


class DeviceResident:
    """Whole splits on every device; batches gathered inside a jitted scan.

    The data (43 MB for the training split) is replicated; the (steps, batch) index arrays
    are split along the batch over the devices, so each device gathers and trains on its
    part of every batch.
    """

    def __init__(self, train: Split, evals: dict[str, Split | None], *, devices: Devices,
                 batch_size: int, eval_batch_size: int, steps_per_dispatch: int,
                 seed: list[int]):
        self.num_train = len(train.labels)
        check_batch_size(batch_size, self.num_train, devices)
        self.batch_size = batch_size
        self.steps_per_epoch = self.num_train // batch_size
        self.steps_per_dispatch = dispatch_steps(self.steps_per_epoch, steps_per_dispatch)
        self.train = devices.replicate((train.images, train.labels))
        eval_batch_size = per_device_multiple(eval_batch_size, devices)
        self.splits = {name: split for name, split in evals.items() if split is not None}
        # Every evaluation runs in chunks of the first split's number of batches (the
        # others padded with blank batches to a multiple): one program, one compilation.
        first = next(iter(self.splits.values()))
        self.eval_chunk = -(-len(first.labels) // eval_batch_size)
        self.evals = {name: devices.put(_chunked(batched(split.images, eval_batch_size),
                                                 self.eval_chunk), devices.sharded(axis=1))
                      for name, split in self.splits.items()}
        self.has_validation = "validation" in self.evals
        self._seed = list(seed)
        self._devices = devices

    def epoch_order(self, epoch: int) -> jax.Array:
        """The epoch's batches as (steps, batch) indices, the same on every process; the
        tail that fills no batch is left out this epoch (a different tail every epoch)."""
        perm = np.random.default_rng([*self._seed, epoch]).permutation(self.num_train)
        used = self.steps_per_epoch * self.batch_size
        order = perm[:used].reshape(self.steps_per_epoch, self.batch_size).astype(np.int32)
        return self._devices.put(order, self._devices.sharded(axis=1))

    def train_epoch(self, state: TrainState, epoch: int, steps: Steps, start_step: int = 0
                    ) -> Iterator[tuple[TrainState, dict, int]]:
        order = self.epoch_order(epoch)
        images, labels = self.train
        for start in range(start_step, self.steps_per_epoch, self.steps_per_dispatch):
            indices = order[start:start + self.steps_per_dispatch]
            state, metrics = steps.train_scan(state, images, labels, indices)
            yield state, metrics, indices.shape[0]

    def evaluate(self, variables: dict, split: str, steps: Steps, monitor: bool = False
                 ) -> np.ndarray:
        """The logits ``(N, 10)`` of every image of ``split``, on the host (``monitor``:
        without test-time augmentation)."""
        batches, chunk = self.evals[split], self.eval_chunk
        run = steps.monitor_batches if monitor else steps.eval_batches
        logits = [unbatched(run(variables, batches[i:i + chunk]), None)
                  for i in range(0, len(batches), chunk)]
        return np.concatenate(logits)[:len(self.splits[split].labels)]

    def split(self, name: str) -> Split:
        """The images and labels of an evaluation split, on the host."""
        return self.splits[name]

    def train_sample(self, n: int) -> np.ndarray:
        """The first ``n`` training images (after the validation split), on the host."""
        return np.asarray(self.train[0].addressable_data(0)[:n])


def _chunked(batches: np.ndarray, chunk: int) -> np.ndarray:
    """``batches`` followed by blank batches, up to a multiple of ``chunk``."""
    pad = -len(batches) % chunk
    return np.concatenate([batches, np.zeros((pad, *batches.shape[1:]), batches.dtype)])


class Streamed:
    """A random-access source (tfds's ``fashion_mnist``) read through Grain, in the
    default pipeline's order semantics: a fresh permutation each epoch (Grain's shuffle,
    reseeded per epoch), full batches only (the tail that fills no batch is left out that
    epoch), and ``steps_per_dispatch`` steps per host call, run by the same jitted scan.

    Grain's threads read and batch ahead (``prefetch`` chunks of steps). Every epoch is a
    deterministic function of (seed, epoch), so training resumes exactly at any step: the
    position is the epoch and the step within it. On several hosts each process reads and
    feeds only its devices' rows of every batch; the logits of an evaluation come back in
    the split's order on every process.
    """

    def __init__(self, sources: dict, *, devices: Devices, batch_size: int,
                 eval_batch_size: int, steps_per_dispatch: int, validation_size: int,
                 seed: int, threads: int = 4, prefetch: int = 2,
                 image_shape: tuple[int, ...] = IMAGE_SHAPE):
        import grain

        train = sources["train"]
        if not 0 <= validation_size < len(train):
            raise UserError(f"--validation_size={validation_size} must be in "
                            f"[0, {len(train)}) (tfds train split size)")
        record = functools.partial(_record, shape=tuple(image_shape))
        self.image_shape = tuple(image_shape)
        source = grain.MapDataset.source(train).map(record)
        self._train_source = source[validation_size:]
        self.training = self._train_source.shuffle(seed=seed).repeat()
        self.num_train = len(train) - validation_size
        check_batch_size(batch_size, self.num_train, devices)
        self.batch_size = batch_size
        self.steps_per_epoch = self.num_train // batch_size
        self.steps_per_dispatch = dispatch_steps(self.steps_per_epoch, steps_per_dispatch)
        self.eval_batch_size = per_device_multiple(eval_batch_size, devices)
        self.sources = {"validation": source[:validation_size],
                        "test": grain.MapDataset.source(sources["test"]).map(record)}
        self.has_validation = validation_size > 0
        self.devices = devices
        self.read_options = grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=prefetch)
        self._splits: dict[str, Split] = {}

    def _chunks(self, dataset, batch_size: int, steps: int):
        """Grain iterator of ``(steps, rows)`` chunks of this process's rows of each batch
        (:meth:`Devices.local_rows`): the other rows are never read."""
        import grain

        rows = self.devices.local_rows(batch_size)
        mine = grain.MapDataset.range(len(dataset) // batch_size * len(rows)).map(
            lambda i: dataset[i // len(rows) * batch_size + int(rows[i % len(rows)])])
        chunks = mine.batch(len(rows)).batch(steps)
        return iter(chunks.to_iter_dataset(self.read_options))

    def train_epoch(self, state: TrainState, epoch: int, steps: Steps, start_step: int = 0
                    ) -> Iterator[tuple[TrainState, dict, int]]:
        first = (epoch - 1) * self.num_train
        epoch_data = self.training[first + start_step * self.batch_size:
                                   first + self.steps_per_epoch * self.batch_size]
        chunks = self._chunks(epoch_data, self.batch_size, self.steps_per_dispatch)
        try:
            for chunk in chunks:
                images, labels = (self.devices.shard_batch(chunk[k], self.batch_size, axis=1)
                                  for k in ("image", "label"))
                state, metrics = steps.train_batches(state, images, labels)
                yield state, metrics, int(chunk["label"].shape[0])
        finally:
            chunks.close()  # an epoch left half-read (early stop, error) stops Grain's threads

    def evaluate(self, variables: dict, split: str, steps: Steps, monitor: bool = False
                 ) -> np.ndarray:
        """The logits ``(N, 10)`` of every image of ``split``, on the host (``monitor``:
        without test-time augmentation)."""
        dataset = self.sources[split]
        run = steps.monitor_batches if monitor else steps.eval_batches
        padded = _padded(dataset, self.eval_batch_size, self.image_shape)
        chunks = self._chunks(padded, self.eval_batch_size, self.steps_per_dispatch)
        try:
            logits = [unbatched(run(
                variables, self.devices.shard_batch(chunk["image"], self.eval_batch_size,
                                                    axis=1)),
                len(chunk["image"]) * self.eval_batch_size) for chunk in chunks]
        finally:
            chunks.close()
        return np.concatenate(logits)[:len(dataset)]

    def split(self, name: str) -> Split:
        """The images and labels of an evaluation split, on the host (read once)."""
        if name not in self._splits:
            records = list(self.sources[name].batch(max(len(self.sources[name]), 1)))
            self._splits[name] = Split(records[0]["image"], records[0]["label"])
        return self._splits[name]

    def train_sample(self, n: int) -> np.ndarray:
        """The first ``n`` training images (after the validation split), on the host."""
        return np.stack([self._train_source[i]["image"]
                         for i in range(min(n, self.num_train))])


def _record(example: dict, shape: tuple[int, ...] = IMAGE_SHAPE) -> dict:
    """A tfds example as arrays: uint8 image ``shape`` and int32 label."""
    return {"image": np.asarray(example["image"], np.uint8).reshape(shape),
            "label": np.int32(example["label"])}


def _padded(dataset, batch_size: int, shape: tuple[int, ...] = IMAGE_SHAPE):
    """``dataset`` followed by black images labelled 0, up to a multiple of ``batch_size``."""
    import grain

    pad = -len(dataset) % batch_size
    blank = {"image": np.zeros(shape, np.uint8), "label": np.int32(0)}
    return grain.MapDataset.concatenate([dataset, grain.MapDataset.range(pad).map(
        lambda _: blank)]) if pad else dataset


def load_tfds(config, devices: Devices, seed: int) -> tuple[Streamed, DataSpec]:
    """The :class:`Streamed` pipeline over tfds's ``--dataset`` for ``config``, and its
    spec (pixel statistics: Fashion-MNIST's known ones, else those of the first
    :data:`STATISTICS_SAMPLE` training images after the validation split)."""
    sources = load_tfds_sources(config.data_dir or None, _manual_dir(config.dataset),
                                config.dataset)
    pipeline = Streamed(sources, devices=devices, batch_size=config.batch_size,
                        eval_batch_size=config.eval_batch_size,
                        steps_per_dispatch=config.steps_per_dispatch,
                        validation_size=config.validation_size, seed=seed,
                        image_shape=sources["image_shape"])
    known = IDX_DATASETS.get(config.dataset)
    statistics = known.statistics if known else None
    if statistics is None:
        statistics = pixel_statistics(pipeline.train_sample(STATISTICS_SAMPLE))
    mean, std = statistics
    return pipeline, DataSpec(sources["image_shape"], sources["class_names"], tuple(mean),
                              tuple(std), "uint8", config.dataset)


STATISTICS_SAMPLE = 10_000


def load_split(config, which: str = "test", data_dir: str | None = None) -> Split | None:
    """The ``test`` or ``validation`` split as the run of ``config`` read it (IDX files or
    tfds), on the host: validation is the first ``config.validation_size`` training images,
    None when the run held none out. ``data_dir`` overrides the run's."""
    if which not in ("test", "validation"):
        raise ValueError(f"which={which!r}: 'test' or 'validation'")
    if which == "validation" and config.validation_size == 0:
        return None
    data_dir = data_dir or config.data_dir or None
    if config.data_source == "tfds":
        sources = load_tfds_sources(data_dir, _manual_dir(config.dataset), config.dataset)
        source, n = ((sources["test"], len(sources["test"])) if which == "test"
                     else (sources["train"], config.validation_size))
        records = [_record(source[i], sources["image_shape"]) for i in range(n)]
        return Split(np.stack([r["image"] for r in records]),
                     np.array([r["label"] for r in records], np.int32))
    train, test, _ = load_arrays(data_dir, idx_dataset(config.dataset))
    if which == "test":
        return test
    return split_validation(train, config.validation_size)[1]


def _manual_dir(dataset: str) -> str | None:
    return local_idx_dir() if dataset == "fashion_mnist" else None


def local_idx_dir() -> str | None:
    """The local official files, if any: tfds prepares from them instead of downloading."""
    try:
        return str(find_files(None, download=False)["train_images"].parent)
    except UserError:
        return None


def load_tfds_sources(data_dir: str | None = None, manual_dir: str | None = None,
                      name: str = "fashion_mnist") -> dict:
    """Random-access ``train`` and ``test`` sources of the tfds data set ``name``, with its
    ``class_names`` and ``image_shape`` (an image-classification data set: an ``image``
    feature of fixed shape and a ``label`` class feature).

    Reads prepared ArrayRecord data without TensorFlow. If the data is not prepared yet,
    preparing it needs TensorFlow (``pip install 'fmnist_jax[tensorflow]'``); ``manual_dir`` may
    hold the four official files (e.g. the ones this package found) so nothing is
    downloaded.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(f"--data_source=tfds needs tensorflow-datasets ({e}); "
                        "pip install tensorflow-datasets")
    # Only Fashion-MNIST is prepared here (from the official files this package found);
    # another data set must be prepared already: no download is started unasked.
    kwargs = {"download": bool(manual_dir)}
    if manual_dir:
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}
    try:
        sources = tfds.data_source(name, split=["train", "test"], data_dir=data_dir or None,
                                   **kwargs)
    except ImportError as e:
        raise UserError(f"tfds has no prepared {name} here, and preparing it needs "
                        f"TensorFlow ({e}): pip install 'fmnist_jax[tensorflow]'"
                        + (", or use --data_source=idx (the default, no TensorFlow)"
                           if name in IDX_DATASETS else
                           f", then python -c \"import tensorflow_datasets as tfds; "
                           f"tfds.builder('{name}').download_and_prepare()\""))
    except (tfds.core.DatasetNotFoundError, NotImplementedError) as e:
        # not a tfds name, not prepared, or prepared as TFRecord (no random access)
        where = data_dir or "tfds's data dir"
        raise UserError(
            f"tfds has no prepared {name} in {where} that it can read at random (ArrayRecord"
            f"); prepare it once (needs TensorFlow and the internet): python -c \"import "
            f"tensorflow_datasets as tfds; tfds.builder('{name}', "
            f"{f'data_dir={data_dir!r}, ' if data_dir else ''}file_format='array_record')"
            f".download_and_prepare()\"") from e
    except Exception as e:  # anything else is tfds's own failure: its traceback is kept
        e.add_note(f"fmnist_jax: tfds.data_source('{name}') failed"
                   + ("; --data_source=idx reads the official files without tfds"
                      if name in IDX_DATASETS else ""))
        raise
    features = sources[0].dataset_info.features
    image, label = (features[k] if k in features.keys() else None for k in ("image", "label"))
    shape = tuple(getattr(image, "shape", ()) or ())
    names = getattr(label, "names", None)
    if len(shape) != 3 or None in shape or not names:
        raise UserError(f"tfds's {name} is not an image-classification data set of fixed-size "
                        f"images: fit needs an 'image' feature (H, W, C) and a 'label' class "
                        f"feature (it has {', '.join(features.keys())})")
    return {"train": sources[0], "test": sources[1], "image_shape": shape,
            "class_names": tuple(names) if name != "fashion_mnist" else CLASS_NAMES}
