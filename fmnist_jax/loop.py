"""The training loop: epochs of dispatches of jitted steps, and the hooks around them.

:class:`Trainer` trains from a :class:`Progress` (where training stands: saved in every
checkpoint) to the last epoch. After every dispatch of steps and every epoch it calls its
hooks in order, each with the same :class:`Event`: the checkpointer (save when due, or when
stopping), the reporter (progress bar, epoch line, metric files) and the stop check (which
raises :class:`Preempted` once the checkpoint is written). What the loop itself owns: the
running training metrics (``nnx.metrics.Average``), the non-finite loss check, evaluation
on the validation split and early stopping (the best epoch is derived from the history by
:func:`best_epoch`).

Signals (:class:`StopSignal`): while training, SIGINT/SIGTERM asks the loop to checkpoint
and stop at the end of the current dispatch, and the hosts of a multi-host run agree on it
(every process stops at the same step; then :class:`Preempted`); a second signal, or one
outside training, interrupts at once (:class:`Interrupted`). Both are ``KeyboardInterrupt``:
in a notebook an interrupt stops ``fit`` as it stops any cell, and the kernel lives on.
"""

from __future__ import annotations

import _thread
import dataclasses
import functools
import signal
import sys
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np
import optax
from flax import nnx

from fmnist_jax import callbacks as callbacks_lib
from fmnist_jax import metrics as metrics_lib
from fmnist_jax import parallel
from fmnist_jax.config import Config, monitor_sign
from fmnist_jax.report import process_age
from fmnist_jax.steps import TrainState, inference_variables


class Preempted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM at a dispatch boundary, after saving a
    checkpoint (when there is a workdir)."""

    def __init__(self, message: str, signum: int, workdir=None):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
        self.workdir = workdir


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM outside the training loop (set-up, data loading, final test), or
    a second one during training: at once."""

    def __init__(self, signum: int, during_training: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.during_training = during_training


TRAIN_METRICS = ("loss", "accuracy")


def train_metrics() -> nnx.MultiMetric:
    """The running means of an epoch's per-step training loss and accuracy."""
    return nnx.MultiMetric(**{name: nnx.metrics.Average(name) for name in TRAIN_METRICS})


def best_epoch(history: Sequence[dict], monitor: str) -> int:
    """The epoch (1-based) of the best ``monitor`` value in ``history``, the earliest on
    ties; 0 when no record has it. The one definition of "best", for early stopping and
    the weights a run reports."""
    best, sign = 0, monitor_sign(monitor)
    for record in history:
        value = record.get(monitor)
        if value is not None and (not best or sign * value > sign * history[best - 1][monitor]):
            best = record["epoch"]
    return best


@dataclasses.dataclass
class Progress:
    """Where training stands; :meth:`to_meta` goes into every checkpoint. ``monitor`` and
    ``patience`` come from the run's config; the best epoch and early stopping are derived
    from the history."""

    epochs: int = 1  # the run's --epochs
    monitor: str = "val_accuracy"
    patience: int = 0
    epoch: int = 1  # the epoch in progress
    step_in_epoch: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    metrics: nnx.MultiMetric = dataclasses.field(default_factory=train_metrics)
    wall_time_s: float = 0.0  # spent by earlier processes of this run
    stopped_by: str | None = None  # the callback that raised StopTraining, and why

    @classmethod
    def start(cls, config: Config) -> Progress:
        return cls(config.epochs, config.monitor, config.patience)

    @property
    def best_epoch(self) -> int:
        return best_epoch(self.history, self.monitor)

    @property
    def stopped_early(self) -> bool:
        """``patience`` epochs have ended without a better ``monitor`` value."""
        best = self.best_epoch
        return bool(self.patience and best) and self.history[-1]["epoch"] - best >= self.patience

    @property
    def finished(self) -> bool:
        """The last epoch has ended, or early stopping or a callback ended training."""
        return self.epoch > self.epochs or self.stopped_early or self.stopped_by is not None

    def to_meta(self, started: float) -> dict:
        stats = {name: {"total": float(getattr(self.metrics, name).total[...]),
                        "count": int(getattr(self.metrics, name).count[...])}
                 for name in TRAIN_METRICS}
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "history": self.history, "train_metrics": stats,
                "stopped_by": self.stopped_by,
                "wall_time_s": self.wall_time_s + time.perf_counter() - started}

    @classmethod
    def from_meta(cls, meta: dict, config: Config) -> Progress:
        progress = cls(config.epochs, config.monitor, config.patience, meta["epoch"],
                       meta["step_in_epoch"], meta["history"],
                       wall_time_s=meta["wall_time_s"], stopped_by=meta.get("stopped_by"))
        for name in TRAIN_METRICS:
            metric = getattr(progress.metrics, name)
            metric.total[...] = np.float32(meta["train_metrics"][name]["total"])
            metric.count[...] = np.int32(meta["train_metrics"][name]["count"])
        return progress


@dataclasses.dataclass
class Event:
    """What a hook sees after a dispatch or an epoch."""

    state: TrainState
    progress: Progress
    at_epoch_end: bool
    stopping: bool  # a stop signal, agreed by every process: save now, then stop
    record: dict | None = None  # the epoch's record, at epoch ends


class StopSignal:
    """SIGINT/SIGTERM handling, installed for a run and restored after it. While ``armed``
    (in the training loop) the first signal asks the loop to checkpoint and stop, and a
    second one raises :class:`Interrupted` at once; outside the loop there is nothing to
    save, and a signal raises :class:`Interrupted` right away."""

    def __init__(self):
        self.enabled = threading.current_thread() is threading.main_thread()
        self.armed = False
        self.signum: int | None = None
        self._previous: dict = {}
        self._previous_hook = sys.unraisablehook

    def __enter__(self):
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
            self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def _handle(self, signum, frame):
        if not self.armed:
            raise Interrupted(signum)
        if self.signum is not None:
            print(f"\n{signal.Signals(signum).name} again: stopping now", file=sys.stderr,
                  flush=True)
            raise Interrupted(signum, during_training=True)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after the current step, "
              "then stopping (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def agreed(self) -> int | None:
        """The signal any process received, the same on every process (a tiny collective
        on several hosts), or None.

        JAX's own agreement, ``multihost_utils.reached_preemption_sync_point``, must be
        asked at every step id to find its safe step, while this loop looks once per
        dispatch of many steps (and it sees SIGTERM only, with ``jax.distributed``): an
        all-gather of the flag at each dispatch boundary gives every process the same
        answer at the same step."""
        received = self.signum or 0
        if jax.process_count() > 1:
            received = int(np.max(parallel.gather_scalar(received)))
        return received or None

    def _unraisable(self, unraisable) -> None:
        """Where Python ignores exceptions (a garbage-collector or weak-reference callback, a
        finalizer: JAX runs such code often), an :class:`Interrupted` would be printed and
        lost; the signal is sent again instead, to land where it counts."""
        if isinstance(unraisable.exc_value, Interrupted):
            _send_again_soon(unraisable.exc_value.signum)
        else:
            self._previous_hook(unraisable)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self.enabled:
            sys.unraisablehook = self._previous_hook


def _send_again_soon(signum: int) -> None:
    """Sends ``signum`` to the main thread again in 10 ms, from a timer thread, once the
    callback that ignored it has returned (if it lands in one again, it is sent again).
    Raising it again from within the callback cannot work: ``signal.raise_signal`` runs
    the handler before it returns, still inside the callback. A real signal (not
    ``_thread.interrupt_main``) also interrupts a blocking system call, such as a download
    waiting for data."""
    main = threading.main_thread().ident
    send = functools.partial(signal.pthread_kill, main, signum) \
        if hasattr(signal, "pthread_kill") else functools.partial(_thread.interrupt_main, signum)
    timer = threading.Timer(0.01, send)
    timer.daemon = True
    timer.start()


class Trainer:
    """Trains ``built`` (:class:`fmnist_jax.build.Built`) epoch by epoch, calling
    ``hooks`` (objects with ``after_dispatch(event)`` and ``after_epoch(event)``) in order,
    and the user's ``callbacks`` (:mod:`fmnist_jax.callbacks`): each epoch's
    ``on_epoch_end`` runs before the hooks' ``after_epoch``, so that the checkpoint saved
    then knows whether a callback stopped training."""

    def __init__(self, built, config: Config, hooks: Sequence, stop: StopSignal,
                 started: float, keep_best: bool, callbacks: Sequence = ()):
        self.built, self.config, self.hooks, self.stop = built, config, hooks, stop
        self.callbacks = callbacks
        self.started = started
        # Without checkpoints to restore it from, early stopping keeps a copy of the best
        # epoch's weights (the inference variables alone, not the optimizer state).
        self.keep_best = keep_best
        self.best_variables: dict | None = None

    def run(self, state: TrainState, progress: Progress) -> TrainState:
        self.stop.armed = True
        try:
            self._callback(progress, "on_train_begin", {})
            while not progress.finished:
                self._callback(progress, "on_epoch_begin", progress.epoch, {})
                if progress.finished:
                    break
                state = self._train_epoch(state, progress)
        finally:
            self.stop.armed = False
        return state

    def _callback(self, progress: Progress, method: str, *args) -> None:
        stopped = callbacks_lib.call(self.callbacks, method, *args)
        if stopped and progress.stopped_by is None:
            progress.stopped_by = stopped

    def _train_epoch(self, state: TrainState, progress: Progress) -> TrainState:
        start, done, pipeline = time.perf_counter(), 0, self.built.pipeline
        for state, metrics, n in pipeline.train_epoch(state, progress.epoch, self.built.steps,
                                                      progress.step_in_epoch):
            values = jax.device_get(metrics)  # one host sync per dispatch
            self._check_finite(values, int(state.step) - n, progress)
            progress.metrics.update(loss=values["loss"], accuracy=values["accuracy"])
            progress.step_in_epoch += n
            done += n
            at_end = progress.step_in_epoch == pipeline.steps_per_epoch
            self._call("after_dispatch", Event(state, progress, at_end, self._stopping(at_end)))
        seconds = time.perf_counter() - start
        record = self._end_epoch(state, progress, seconds, done)
        self._callback(progress, "on_epoch_end", record["epoch"], dict(record))
        self._call("after_epoch", Event(state, progress, True,
                                        not progress.finished and self._stopping(False),
                                        record))
        return state

    def _stopping(self, at_epoch_end: bool) -> bool:
        return not at_epoch_end and self.stop.agreed() is not None

    def _call(self, method: str, event: Event) -> None:
        for hook in self.hooks:
            getattr(hook, method)(event)

    def _check_finite(self, values: dict, first_step: int, progress: Progress) -> None:
        bad = np.flatnonzero(~np.isfinite(values["loss"]))
        if bad.size:
            raise NonFiniteLoss(first_step + int(bad[0]), progress.epoch)

    def _end_epoch(self, state: TrainState, progress: Progress, seconds: float,
                   done: int) -> dict:
        """The epoch's record (validation and, if asked, test metrics included), a copy of
        the best weights when kept in memory, and the position moved to the next epoch."""
        train = {k: float(v) for k, v in progress.metrics.compute().items()}
        record = {"epoch": progress.epoch, "step": int(state.step),
                  "learning_rate": self._learning_rate(state),
                  "train_loss": train["loss"], "train_accuracy": train["accuracy"],
                  "epoch_time_s": seconds,
                  "images_per_s": done * self.config.batch_size / seconds}
        for split, prefix in (("validation", "val"), ("test", "test")):
            if split == "validation" and self.built.pipeline.has_validation or \
                    split == "test" and self.config.test_every_epoch:
                began = time.perf_counter()
                scores, _ = evaluate(self.built, state, split, monitor=True)
                record.update({f"{prefix}_loss": scores["loss"],
                               f"{prefix}_accuracy": scores["accuracy"]})
                if split == "test":  # time-to-accuracy benchmarks take this time off
                    record["test_eval_s"] = time.perf_counter() - began
        if self.config.test_every_epoch:
            record["process_age_s"] = process_age()
        record["wall_time_s"] = progress.wall_time_s + time.perf_counter() - self.started
        progress.history.append(record)
        if self.keep_best and progress.best_epoch == record["epoch"]:
            self.best_variables = jax.tree.map(jax.numpy.copy, inference_variables(state))
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
        progress.metrics.reset()
        return record

    def _learning_rate(self, state: TrainState) -> float | None:
        if self.built.schedule is not None:
            return float(self.built.schedule(state.step))
        found = optax.tree_utils.tree_get(state.opt_state, "learning_rate")
        return None if found is None else float(found)


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite at ``step``."""

    def __init__(self, step: int, epoch: int):
        super().__init__(f"non-finite loss at step {step}")
        self.step, self.epoch = step, epoch


def evaluate(built, state: TrainState, split: str, variables: dict | None = None,
             monitor: bool = False) -> tuple[dict, np.ndarray]:
    """Loss, accuracy and count of ``split`` (with the state's inference weights, or
    ``variables``), and the logits they were computed from; ``monitor``: without the
    run's test-time augmentation (the per-epoch evaluations)."""
    variables = variables if variables is not None else inference_variables(state)
    logits = built.pipeline.evaluate(variables, split, built.steps, monitor)
    return metrics_lib.classification(logits, built.pipeline.split(split).labels), logits
