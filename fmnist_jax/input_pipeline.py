"""Getting batches to the step functions: device-resident (default) or streamed from tfds.

Both pipelines feed the same jitted steps of :mod:`fmnist_jax.steps` and share one
interface: ``train_epoch(state, epoch, steps)`` yields ``(state, metric_sums, num_steps)`` as
it goes (the sums carry ``first_nonfinite``, the first step with a NaN or infinite loss or
-1), ``evaluate(variables, split, steps)`` returns the logits of every image of a split on
the host, and ``split(name)`` its images and labels.

- :class:`DeviceResident`: each split lives on the device as uint8 (55,000 training images
  are 43 MB). Every epoch draws a fresh permutation on the host (numpy: 0.1 ms, against 28 ms for
  ``jax.random.permutation``'s sort on XLA:CPU), sends the 220 KB of indices, and runs
  ``steps_per_dispatch`` steps per host call inside a jitted ``lax.scan`` that gathers its
  batches on the device, so the host is out of the loop.
- :class:`TfdsStream`: reads ``fashion_mnist`` through ``tfds.data_source`` (random-access
  ArrayRecord files; no TensorFlow needed once prepared) and streams batches from a
  background thread that keeps two batches in flight to the device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax.data import CLASS_NAMES, Split, find_files, load_arrays
from fmnist_jax.errors import UserError
from fmnist_jax.parallel import Devices, to_host
from fmnist_jax.steps import Steps, TrainState


def batched(images: np.ndarray, batch_size: int) -> np.ndarray:
    """``(batches, batch_size, ...)`` images, the last batch padded with black images."""
    n = len(images)
    batches = -(-n // batch_size)
    pad = np.zeros((batches * batch_size - n, *images.shape[1:]), images.dtype)
    return np.concatenate([images, pad]).reshape(batches, batch_size, *images.shape[1:])


def unbatched(logits, n: int) -> np.ndarray:
    """The logits of :func:`batched` images on the host, ``(n, classes)``, padding dropped."""
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
                 rng: jax.Array):
        self.num_train = len(train.labels)
        check_batch_size(batch_size, self.num_train, devices)
        self.batch_size = batch_size
        self.steps_per_epoch = self.num_train // batch_size
        self.steps_per_dispatch = steps_per_dispatch
        self.train = devices.replicate((train.images, train.labels))
        eval_batch_size = per_device_multiple(eval_batch_size, devices)
        self.splits = {name: split for name, split in evals.items() if split is not None}
        self.evals = {name: devices.put(batched(split.images, eval_batch_size),
                                        devices.sharded(axis=1))
                      for name, split in self.splits.items()}
        self.has_validation = "validation" in self.evals
        self._seed = [int(w) for w in np.asarray(jax.random.key_data(rng)).ravel()]
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
            state, sums = steps.train_scan(state, images, labels, indices)
            yield state, sums, indices.shape[0]

    def evaluate(self, variables: dict, split: str, steps: Steps) -> np.ndarray:
        """The logits ``(N, 10)`` of every image of ``split``, on the host."""
        return unbatched(steps.eval_batches(variables, self.evals[split]),
                         len(self.splits[split].labels))

    def split(self, name: str) -> Split:
        """The images and labels of an evaluation split, on the host."""
        return self.splits[name]


class TfdsStream:
    """``fashion_mnist`` from tensorflow-datasets, streamed from the host with prefetch.

    The first ``validation_size`` examples of tfds's ``train`` split are the validation
    split (tfds stores examples in its own shuffled order, so these are not the same images
    as the IDX pipeline's validation split).
    """

    def __init__(self, *, devices: Devices, batch_size: int, eval_batch_size: int,
                 validation_size: int, seed: int, data_dir: str | None = None,
                 manual_dir: str | None = None):
        self.sources = load_tfds_sources(data_dir, manual_dir)
        train = self.sources["train"]
        if not 0 <= validation_size < len(train):
            raise UserError(f"--validation_size={validation_size} must be in "
                            f"[0, {len(train)}) (tfds train split size)")
        self.train_index = np.arange(validation_size, len(train))
        self.has_validation = validation_size > 0
        self.split_index = {"validation": np.arange(validation_size),
                            "test": np.arange(len(self.sources["test"]))}
        self.num_train = len(self.train_index)
        check_batch_size(batch_size, self.num_train, devices)
        self.devices = devices
        self.batch_size = batch_size
        self.eval_batch_size = per_device_multiple(eval_batch_size, devices)
        self.steps_per_epoch = self.num_train // batch_size
        self.seed = seed
        self._splits: dict[str, Split] = {}

    @staticmethod
    def _gather(source, index: np.ndarray) -> Split:
        records = [source[int(i)] for i in index]
        images = np.stack([np.asarray(r["image"], np.uint8).reshape(28, 28, 1)
                           for r in records])
        labels = np.asarray([r["label"] for r in records], np.int32)
        return Split(images, labels)

    def _stream(self, batches: Iterator, axis: int = 0) -> Iterator:
        """Runs ``batches`` (this process's part of each) in a thread, two batches ahead,
        already split over the devices."""
        slots: queue.Queue = queue.Queue(maxsize=2)
        done = object()
        stop = threading.Event()

        def put(item) -> bool:  # False once the consumer has gone (early stop, error)
            while not stop.is_set():
                try:
                    slots.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            try:
                for batch in batches:
                    if not put(self.devices.shard_batch(batch, axis)):
                        return
                put(done)
            except BaseException as e:  # re-raised in the consumer
                put(e)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        try:
            while (item := slots.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            producer.join()

    def train_epoch(self, state: TrainState, epoch: int, steps: Steps, start_step: int = 0
                    ) -> Iterator[tuple[TrainState, dict, int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.train_index)
        source = self.sources["train"]

        mine = self.devices.local_slice(self.batch_size)

        def batches():
            for step in range(start_step, self.steps_per_epoch):
                batch = order[step * self.batch_size:(step + 1) * self.batch_size]
                images, labels = self._gather(source, batch[mine])
                yield {"image": images, "label": labels}

        for batch in self._stream(batches()):
            state, metrics = steps.train_step(state, batch)  # donates the old state
            bad = jnp.where(jnp.isfinite(metrics["loss"]), -1, state.step - 1)
            yield state, {**metrics, "first_nonfinite": bad}, 1

    def evaluate(self, variables: dict, split: str, steps: Steps) -> np.ndarray:
        """The logits ``(N, 10)`` of every image of ``split``, on the host."""
        source = self.sources["train" if split == "validation" else "test"]
        index = self.split_index[split]
        mine = self.devices.local_slice(self.eval_batch_size)

        def batches():
            for start in range(0, len(index), self.eval_batch_size):
                images, _ = self._gather(source, index[start:start + self.eval_batch_size])
                yield batched(images, self.eval_batch_size)[:, mine]

        return np.concatenate([
            unbatched(steps.eval_batches(variables, images), self.eval_batch_size)
            for images in self._stream(batches(), axis=1)])[:len(index)]

    def split(self, name: str) -> Split:
        """The images and labels of an evaluation split, on the host (read once)."""
        if name not in self._splits:
            source = self.sources["train" if name == "validation" else "test"]
            self._splits[name] = self._gather(source, self.split_index[name])
        return self._splits[name]


def load_test_split(config, data_dir: str | None = None) -> Split:
    """The test split as the run of ``config`` read it (IDX files or tfds), on the host;
    ``data_dir`` overrides the run's."""
    data_dir = data_dir or config.data_dir or None
    if config.data_source == "tfds":
        source = load_tfds_sources(data_dir, local_idx_dir())["test"]
        return TfdsStream._gather(source, np.arange(len(source)))
    return Split(*load_arrays(data_dir)[1])


def local_idx_dir() -> str | None:
    """The local official files, if any: tfds prepares from them instead of downloading."""
    try:
        return str(find_files(None, download=False)["train_images"].parent)
    except UserError:
        return None


def load_tfds_sources(data_dir: str | None = None, manual_dir: str | None = None) -> dict:
    """Random-access ``train`` and ``test`` sources of tfds's ``fashion_mnist``.

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
    kwargs = {}
    if manual_dir:
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}
    try:
        sources = tfds.data_source("fashion_mnist", split=["train", "test"],
                                   data_dir=data_dir or None, **kwargs)
    except ImportError as e:
        raise UserError("tfds has no prepared fashion_mnist here, and preparing it needs "
                        f"TensorFlow ({e}): pip install 'fmnist_jax[tensorflow]', or use "
                        "--data_source=idx (the default, no TensorFlow)")
    except Exception as e:  # tfds raises many types; the message is what matters here
        raise UserError(f"tfds could not load fashion_mnist: {type(e).__name__}: {e}")
    return {"train": sources[0], "test": sources[1], "class_names": CLASS_NAMES}
