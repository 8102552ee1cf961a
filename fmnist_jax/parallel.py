"""All the devices of all the hosts: one mesh with a ``data`` axis.

Data parallelism with ``jax.sharding``: every batch is split along the ``data`` axis, the
parameters and optimizer state are replicated, and XLA inserts the gradient all-reduce. One
device is the same code with a mesh of size one. Batch-norm statistics are computed over the
*global* batch, as on one device, because the steps are written for the whole batch and
jit partitions them.

Several hosts (a TPU pod slice, a GPU cluster): :func:`setup` calls
``jax.distributed.initialize()`` when asked (``--distributed``) or when the environment names
a coordinator (``JAX_COORDINATOR_ADDRESS``); JAX auto-detects TPU pods, SLURM and Open MPI.
Each host then feeds the rows of every batch that belong to its own devices (with the tfds
pipeline it reads only those), and only process 0 prints and writes files (checkpoints are
written by all, through Orbax, into a workdir that every host must see: a shared
filesystem).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fmnist_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Devices:
    """The mesh and the shardings a run uses."""

    mesh: Mesh

    @property
    def count(self) -> int:
        return self.mesh.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def sharded(self, axis: int = 0) -> NamedSharding:
        """Split along ``axis`` over the ``data`` axis of the mesh."""
        return NamedSharding(self.mesh, P(*([None] * axis), "data"))

    def replicate(self, tree):
        """Places host values (the same on every process) on every device."""
        return self.put(tree, self.replicated)

    def put(self, tree, sharding: NamedSharding):
        """Places host values, the whole (global) arrays on every process, with
        ``sharding``; each process transfers only what its own devices hold."""
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)

        def put(x):
            is_key = jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
            data = np.asarray(jax.random.key_data(x) if is_key else x)
            out = jax.make_array_from_callback(data.shape, sharding, lambda i: data[i])
            return jax.random.wrap_key_data(out) if is_key else out

        return jax.tree.map(put, tree)

    def local_rows(self, size: int) -> np.ndarray:
        """The rows of a global batch of ``size``, split over the ``data`` axis, that this
        process's devices hold, in order: on several hosts each process reads and feeds
        only these. They follow the mesh's device order, so they need not be contiguous."""
        shards = self.sharded().addressable_devices_indices_map((size,)).values()
        return np.unique(np.concatenate([np.arange(size)[index[0]] for index in shards]))

    def shard_batch(self, tree, size: int, axis: int = 0):
        """Places this process's rows (:meth:`local_rows` of ``size``, in order, along
        ``axis``) of a global batch on its devices, each where the mesh expects it."""
        sharding = self.sharded(axis)
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)
        rows = self.local_rows(size)

        def put(x):
            shape = (*x.shape[:axis], size, *x.shape[axis + 1:])

            def shard(index):  # a device's global rows, a contiguous run of this process's
                start, stop, _ = index[axis].indices(size)
                first = int(np.searchsorted(rows, start))
                local = list(index)
                local[axis] = slice(first, first + stop - start)
                return x[tuple(local)]

            return jax.make_array_from_callback(shape, sharding, shard)

        return jax.tree.map(put, tree)

    def check_batch_size(self, batch_size: int, flag: str = "--batch_size") -> None:
        if batch_size % self.count:
            raise UserError(
                f"{flag}={batch_size} does not divide over the {self.count} devices "
                f"({jax.devices()[0].platform}); use a multiple of {self.count}, e.g. "
                f"{max(self.count, batch_size // self.count * self.count)}")


def setup(distributed: bool = False) -> Devices:
    """Joins the other hosts if asked (:func:`join`), and builds a 1-D ``data`` mesh over
    all devices."""
    join(distributed)
    return Devices(jax.make_mesh((jax.device_count(),), ("data",),
                                 axis_types=(jax.sharding.AxisType.Auto,)))


def join(distributed: bool = False) -> None:
    """``jax.distributed.initialize()`` when asked or when ``JAX_COORDINATOR_ADDRESS`` is
    set, once; it must come before anything computes with JAX. Without a cluster JAX
    detects, set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) and, on each host,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``."""
    if (distributed or os.environ.get("JAX_COORDINATOR_ADDRESS")) and \
            not jax.distributed.is_initialized():
        count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        try:
            jax.distributed.initialize(num_processes=int(count) if count else None,
                                       process_id=int(index) if index else None)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"--distributed: jax.distributed.initialize() failed ({e}); "
                            "on a cluster JAX does not detect, set JAX_COORDINATOR_ADDRESS="
                            "host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host")


def to_host(x) -> np.ndarray:
    """A (possibly sharded) array as one numpy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather_scalar(value) -> np.ndarray:
    """``value`` of every process, ``(processes,)``, on every process (a collective)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def is_main_process() -> bool:
    """Only process 0 prints, writes metrics and plots."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits for every process to get here (a no-op on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
