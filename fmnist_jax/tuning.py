"""Process tuning for the command-line tools, in one place: what ``fmnist-train`` and its
siblings do to the process they own. Nothing here runs on ``import fmnist_jax`` or inside
``fit``; a program of yours may call any of it. Each earns its place with a figure
(CONTRIBUTING.md lists them):

- :func:`enable_compilation_cache`: JAX's persistent compilation cache (``--compilation_cache``);
- :func:`trim_after_compiling`: the heap XLA's compiler freed handed back to the system;
- :func:`unroll_threefry_on_cpu`: ``jax.random``'s hash compiled without its loop on a CPU;
- :func:`exit_now`: the process ends once its files are closed, without Python's teardown.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax.data import cache_dir


def tune_command_line(compilation_cache: bool) -> None:
    """Everything a command-line tool does to its process before it computes."""
    if compilation_cache:  # first: the check of unroll_threefry_on_cpu compiles
        enable_compilation_cache()
    unroll_threefry_on_cpu()
    _listen(trim_after_compiling)


@functools.cache
def _listen(listener) -> None:
    """Registers a JAX monitoring listener once per process, however often a tool's
    ``main`` runs in it."""
    jax.monitoring.register_event_duration_secs_listener(listener)


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in ``$XDG_CACHE_HOME/fmnist_jax/jax``: a second
    run of the same programs skips XLA's compilation. A process-wide setting: the
    command line turns it on (``--compilation_cache``); ``fit`` leaves JAX's as it is."""
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no minimum


def trim_after_compiling(event: str, seconds: float, **_) -> None:
    """A JAX monitoring listener: after an XLA compilation of a second or more, before the
    program runs, glibc's ``malloc_trim`` gives the heap's free pages back to the system.
    XLA:CPU's compiler frees most of what it allocates, but glibc keeps it resident: ~350
    MB after the ResNet's training step, under the buffers its run then allocates. Peak
    RSS of 20-step runs on 2 cores: resnet 1,472-1,480 MB without the trim, 1,158-1,170
    with it; cnn 712 -> 605, cnn_seed 715 -> 651. Each trim takes 10-60 ms; without glibc
    (macOS, musl) nothing happens."""
    if event == "/jax/core/compile/backend_compile_duration" and seconds >= 1.0:
        trim = getattr(_libc(), "malloc_trim", None)
        if trim is not None:
            trim(0)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None)  # the process's own symbols
    except (OSError, TypeError):  # Windows
        return None


def _threefry2x32(key1, key2, x1, x2):
    """The Threefry-2x32 hash (Salmon et al., 2011: 20 rounds, a key injection every 4),
    written out round by round: the function behind ``jax.random``'s default keys."""
    rotate = lambda v, d: jax.lax.shift_left(v, d) | jax.lax.shift_right_logical(  # noqa
        v, np.uint32(32 - d))
    rotations = (np.uint32([13, 15, 26, 6]), np.uint32([17, 29, 16, 24]))
    keys = (key1, key2, key1 ^ key2 ^ np.uint32(0x1BD11BDA))
    x = [x1 + keys[0], x2 + keys[1]]
    for group in range(5):
        for r in rotations[group % 2]:
            x[0] = x[0] + x[1]
            x[1] = x[0] ^ rotate(x[1], r)
        x = [x[0] + keys[(group + 1) % 3], x[1] + keys[(group + 2) % 3] + np.uint32(group + 1)]
    return x


def unroll_threefry_on_cpu() -> bool:
    """Compiles ``jax.random``'s Threefry hash for the CPU as straight-line code instead of
    JAX's loop of 5 rounds (public API: ``jax.extend.random.threefry2x32_p`` and
    ``jax.interpreters.mlir``); the bits are the same. XLA:CPU runs each round of the loop
    as separate kernels: the seed MLP's step, whose dropout draws a mask per layer, took
    0.233 ms with the loop and 0.197 ms unrolled on 2 cores.

    A change of JAX's process-wide lowering table, so it is never done on import: the
    command-line tools call it; a program of yours may. First it checks that this hash
    gives JAX's bits for a sample; if not (or the API moved), it changes nothing and
    returns False.
    """
    try:
        from jax.extend.random import threefry2x32_p
        from jax.interpreters import mlir

        args = [jnp.asarray(np.random.default_rng(0).integers(0, 2**32, 64, np.uint32))
                for _ in range(4)]
        expected = jax.jit(threefry2x32_p.bind)(*args)
        got = jax.jit(_threefry2x32)(*args)
        if not all(np.array_equal(a, b) for a, b in zip(expected, got)):
            return False
        mlir.register_lowering(threefry2x32_p, mlir.lower_fun(_threefry2x32), platform="cpu")
    except Exception:  # noqa: BLE001 - any change upstream: keep JAX's own rule
        return False
    return True


def exit_now(code: int) -> typing.NoReturn:
    """Ends a command-line tool's process with ``code`` once its work is done and its files
    are closed: the exit hooks run (``atexit``: logging, JAX's), Python's teardown of every
    module and object does not. That teardown (JAX's CPU client among them) took 0.7 s after
    every training run on 2 CPU cores, 6% of a 10-epoch seed-MLP run. A failure (``code``
    not 0), a run of several processes (``jax.distributed``), a process under a profiler,
    tracer or coverage tool (which report at exit), or a Python without
    ``atexit._run_exitfuncs`` exits the usual way."""
    jax = sys.modules.get("jax")
    run_exit_hooks = getattr(atexit, "_run_exitfuncs", None)
    if (code != 0 or run_exit_hooks is None or _observed()
            or (jax is not None and jax.process_count() > 1)):
        sys.exit(code)
    run_exit_hooks()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


def _observed() -> bool:
    """Whether a profiler, tracer or coverage tool watches this process (``cProfile``,
    ``trace``, ``coverage``: ``sys.setprofile``/``settrace``, or ``sys.monitoring`` on
    Python 3.12+)."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and any(monitoring.get_tool(i) is not None
                                          for i in range(6))
