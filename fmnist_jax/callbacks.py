"""Code of yours that runs during ``fit``: Keras-style callbacks, and the profiler.

A callback is any object with any of these methods (Keras's names)::

    on_train_begin(logs)          # logs: {} (a resumed run starts here too)
    on_epoch_begin(epoch, logs)   # epoch: 1-based, as in metrics.jsonl; logs: {}
    on_epoch_end(epoch, logs)     # logs: the epoch's record, as in metrics.jsonl
    on_train_end(logs)            # logs: the run's summary, as in summary.json

Raising :class:`StopTraining` in one ends training cleanly: after the epoch that is
ending (or before the one that is beginning), the run's model is evaluated and saved as
usual and the summary's ``stopped_by`` names the callback. Any other exception stops the
run with its own traceback, after the checkpoints being written are complete. On several
hosts every process runs the callbacks, with the same logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax

CALLBACK_METHODS = ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_end")


class StopTraining(Exception):
    """Raised by a callback to end training after the current epoch (Keras's
    ``model.stop_training = True``, Lightning's ``trainer.should_stop``)."""


def check_callbacks(callbacks: Sequence) -> None:
    """A TypeError naming any callback without one of :data:`CALLBACK_METHODS`."""
    for callback in callbacks:
        if not any(callable(getattr(callback, m, None)) for m in CALLBACK_METHODS):
            raise TypeError(f"callback {callback!r} has none of the methods "
                            f"{', '.join(CALLBACK_METHODS)}")


def call(callbacks: Sequence, method: str, *args) -> str | None:
    """Calls ``method`` of every callback that has it, in order; every one runs even after
    one raised :class:`StopTraining`. Returns who stopped training and why, or None."""
    stopped = None
    for callback in callbacks:
        function = getattr(callback, method, None)
        if function is None:
            continue
        try:
            function(*args)
        except StopTraining as e:
            stopped = stopped or f"{type(callback).__name__}.{method}" + (f": {e}" if str(e)
                                                                          else "")
    return stopped


class Profiler:
    """A training hook: a ``jax.profiler`` trace of at least ``steps`` steady-state training
    steps, in whole dispatches (``--steps_per_dispatch`` sets their length), from the
    process's second dispatch on (the first compiles), ending early at an epoch's last
    dispatch (evaluation is not traced). Written by process 0 into ``directory``:
    TensorBoard's profile plugin reads ``plugins/profile/<time>/*.xplane.pb``; Perfetto
    (https://ui.perfetto.dev) opens ``plugins/profile/<time>/perfetto_trace.json.gz``."""

    def __init__(self, directory: Path, steps: int):
        self.directory, self.steps = directory, steps
        self.first_step: int | None = None  # the state's step when the trace began
        self.traced: int | None = None  # steps in the trace, once it has ended

    def after_dispatch(self, event) -> None:
        if self.traced is not None or jax.process_index() != 0:
            return
        step = int(event.state.step)
        if self.first_step is None:
            if not event.at_epoch_end:  # else: after the epoch's evaluation
                self._start(step)
        elif step - self.first_step >= self.steps or event.at_epoch_end:
            jax.block_until_ready(event.state)
            self.close(step - self.first_step)

    def after_epoch(self, event) -> None:
        if (self.first_step is None and jax.process_index() == 0 and not event.stopping
                and not event.progress.finished):
            self._start(int(event.state.step))

    def _start(self, step: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
        self.first_step = step

    def close(self, traced: int = 0) -> None:
        """Ends a trace still running (training stopped within it)."""
        if self.first_step is not None and self.traced is None:
            self.traced = traced
            jax.profiler.stop_trace()
