"""Process tuning for the command-line tools, in one place: what ``fmnist-train`` and its
siblings do to the process they own. Nothing here runs on ``import fmnist_jax`` or inside
``fit``; a program of yours may call any of it. Each earns its place with a figure
(CONTRIBUTING.md lists them):

- :func:`enable_compilation_cache`: JAX's persistent compilation cache (``--compilation_cache``);
- :func:`trim_after_compiling`: the heap XLA's compiler freed handed back to the system;
- :func:`unroll_threefry_on_cpu`: ``jax.random``'s hash compiled without its loop on a CPU.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax.data import cache_dir


def tune_command_line(compilation_cache: bool) -> None:
    """Everything a command-line tool does to its process before it computes (and after
    it joined the other hosts: :func:`fmnist_jax.parallel.join`)."""
    if compilation_cache and not _cpu_hosts():  # first: unroll_threefry_on_cpu compiles
        enable_compilation_cache()
    unroll_threefry_on_cpu()
    _listen(trim_after_compiling)


def _cpu_hosts() -> bool:
    """Whether several processes share this run on CPUs. The persistent cache is left off
    there: with jax/jaxlib 0.12.1, a program whose collectives cross processes (Gloo) hangs
    when it is read back from the cache (two processes x two CPU devices, 2026-12-06: the
    second run hangs at its first step; 0.12.0.1 and 0.10.2 run it). Such runs try the
    multi-host path; they seldom compile long enough for the cache to matter."""
    return jax.process_count() > 1 and jax.default_backend() == "cpu"


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
    XLA:CPU's compiler frees most of what it allocates, but glibc keeps it resident, under
    the buffers the run then allocates (CONTRIBUTING.md gives the peak-RSS figures).
    Without glibc (macOS, musl) nothing happens."""
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
    as separate kernels, in every training step that draws dropout masks or augmentation
    (CONTRIBUTING.md gives the whole-run figure).

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
