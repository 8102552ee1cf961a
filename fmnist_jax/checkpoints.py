"""Orbax checkpoints of a run, in ``<workdir>/checkpoints``, and the workdir's lock.

A checkpoint is one Orbax step directory holding two items:

- ``state``: the whole :class:`~fmnist_jax.steps.TrainState` (parameters, batch-norm
  statistics, optimizer state, step, and the dropout key as raw key data);
- ``meta``: JSON with the config, the position in the data order (epoch and step within
  it), the running sums of the epoch in progress, the early-stopping record and the
  history so far: everything needed to continue *bitwise* where the run stopped.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
while saving leaves the previous checkpoints intact. The newest ``keep`` checkpoints are
kept, plus the best one by the monitored validation metric.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from fmnist_jax import parallel
from fmnist_jax.config import Config
from fmnist_jax.errors import UserError
from fmnist_jax.steps import TrainState

# Config fields that may differ between a run and its resumption (they do not change what
# is computed), and those that decide the shapes of the parameters: from their metadata.
RESUMABLE_CHANGES = frozenset(Config.fields_marked("resumable"))
ARCHITECTURE = Config.fields_marked("architecture")


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def to_saveable(tree):
    """Typed PRNG keys (the dropout and augmentation keys, ``nnx.Rngs`` streams) as their
    raw key data, which Orbax can write."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_saveable(tree, template):
    """Key data back to keys of the template's PRNG implementation, leaf by leaf."""
    return jax.tree.map(
        lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
        if _is_key(t) else x, tree, template)


class _QuietOrbax(logging.Filter):
    """Drops Orbax's notices about choices made here on purpose: mid-epoch checkpoints have
    no validation metrics, and evaluation opens the checkpoints read-only."""

    NOTICES = ("did not provide metrics", "read_only=True", "directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOTICES)


@contextlib.contextmanager
def quiet_orbax():
    """Orbax's notices about these choices dropped from the absl log, for a block."""
    notices = _QuietOrbax()
    logging.getLogger("absl").addFilter(notices)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(notices)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class WorkdirLock:
    """An exclusive lock on ``<workdir>/.lock``, released when the process ends (even by
    SIGKILL), so two runs never write into the same workdir."""

    def __init__(self, workdir: Path):
        self.path = workdir / ".lock"
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise UserError(f"--workdir={workdir} is in use by another run ({holder}); wait "
                            "for it to finish or choose another --workdir")
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()

    @classmethod
    @contextlib.contextmanager
    def held(cls, workdir: Path | None):
        """The lock held for a block, by process 0 (no workdir: nothing to lock)."""
        lock = cls(workdir) if workdir is not None and parallel.is_main_process() else None
        try:
            yield lock
        finally:
            if lock:
                lock.release()


class Checkpoints:
    """The checkpoints of one workdir: save, find the newest good one, restore."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3,
                 monitor: str = "val_accuracy", read_only: bool = False):
        from fmnist_jax.config import monitor_sign

        self.directory = Path(workdir).absolute() / "checkpoints"
        sign = monitor_sign(monitor)

        def metric(metrics):  # ties go to the earlier step, as in early stopping
            return (sign * metrics[monitor], -metrics["step"])

        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=metric, n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            best_fn=metric, best_mode="max", preservation_policy=None if read_only else policy,
            cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only)
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise UserError(f"{self.directory} does not exist: no checkpoints in this "
                            "workdir (train with --workdir first)")
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------ saving

    def save(self, state: TrainState, meta: dict, metrics: dict | None = None) -> None:
        """Saves in the background; the state may be donated right after this returns."""
        step = int(state.step)
        # Orbax serialises ``meta`` later, on its own thread, while training goes on and
        # appends to the history: it gets a copy taken now.
        snapshot = copy.deepcopy(meta)
        try:
            if step in self.manager.all_steps():  # the same step holds the same state
                return
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(to_saveable(state)),
                meta=ocp.args.JsonSave(snapshot)), metrics=metrics, force=True)
        except (OSError, ValueError) as e:  # disk full, permissions; TensorStore's errors
            raise self._save_error(e) from None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError) as e:  # errors of a background save surface here
            raise self._save_error(e) from None

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _save_error(self, error: Exception) -> UserError:
        good = self.steps()
        return UserError(
            f"could not write a checkpoint in {self.directory} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); the previous checkpoints "
            f"are intact ({'steps ' + ', '.join(map(str, good)) if good else 'none yet'}). "
            "Free some disk space or fix the directory, then run the same command to resume")

    # ------------------------------------------------------------------ finding

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta

    def read_arrays(self, step: int) -> dict:
        """The state of ``step`` as saved (nested dicts of arrays), without a template."""
        with warnings.catch_warnings():  # "sharding info not provided": none is wanted
            warnings.simplefilter("ignore", UserWarning)
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore())).state

    def restore(self, step: int, template, *, partial: bool = False) -> tuple[object, dict]:
        """Restores ``step`` into the structure of ``template`` (shapes must match): the
        whole :class:`TrainState`, or with ``partial`` any part of it given as a dict of
        its fields (e.g. ``{"ema": ...}`` for inference, without the optimizer state)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, to_saveable(template))
        item = (ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True) if partial else ocp.args.StandardRestore(abstract))
        # A manager that saved the state knows it as a StandardSave item, and refuses to
        # read part of it: a partial restore reads through a read-only manager of its own.
        manager = self.manager if self.read_only or not partial else ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=item, meta=ocp.args.JsonRestore()))
        except ValueError as e:
            if "do not match" in str(e) or "shape" in str(e).lower():
                raise UserError(
                    f"checkpoint {self.directory / str(step)} does not fit this model: "
                    f"{str(e).splitlines()[0]} Use --fresh to start over (the old "
                    "checkpoints are moved aside) or another --workdir") from None
            raise
        finally:
            if manager is not self.manager:
                manager.close()
        return from_saveable(restored.state, template), restored.meta

    def restore_latest(self, template: TrainState, config: dict
                       ) -> tuple[TrainState, dict] | None:
        """The newest checkpoint that restores, or None when there is none.

        Only a checkpoint whose files are missing or cannot be decoded (:func:`is_corrupt`)
        is moved to ``checkpoints.corrupt/``, with a warning, and the previous one tried.
        Any other failure (an I/O error, memory, an interrupt) stops with a UserError and
        leaves every checkpoint where it is. A checkpoint of another configuration is
        refused with a message naming the differences.
        """
        steps = self.steps()
        for step in reversed(steps):
            where = self.directory / str(step)
            try:
                meta = self.read_meta(step)
                check_compatible(meta["config"], config, where)
                return self.restore(step, template)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - sorted into corruption and trouble
                if not is_corrupt(e):
                    raise UserError(
                        f"could not read checkpoint {where} ({_first_line(e)}); it is not "
                        "damaged as far as can be told, so every checkpoint was left in "
                        "place. Fix the cause (disk, network file system, memory) and run "
                        "the same command again to resume") from None
                target = self.set_aside(step, "corrupt")
                _warn(f"checkpoint {where} is unreadable ({_first_line(e)}); moved it to "
                      f"{target} and trying the previous one")
        if steps:
            _warn(f"no checkpoint in {self.directory} could be read (all were moved to "
                  f"{self.directory.parent / 'checkpoints.corrupt'}): training starts again "
                  "from step 0")
        return None

    def set_aside(self, step: int, why: str) -> Path:
        """Moves checkpoint ``step`` to ``checkpoints.<why>/`` (nothing is deleted). On
        several hosts process 0 moves it and the others wait."""
        self.wait()
        source = self.directory / str(step)
        folder = self.directory.parent / f"checkpoints.{why}"
        target = folder / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if parallel.is_main_process():
            folder.mkdir(exist_ok=True)
            target = _unused(target)
            shutil.move(str(source), str(target))
        parallel.sync(f"set_aside_{step}")
        self.manager.reload()
        return target


# Errors by which a checkpoint shows that its own files are missing or cannot be decoded:
# JSON that does not parse, an item or file that is not there, and TensorStore's verdicts on
# the array files (seen with orbax 0.12.8 on truncated, overwritten and deleted files).
_CORRUPT_STATUSES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")


def is_corrupt(error: BaseException) -> bool:
    """True when a restore error proves the checkpoint damaged, False for trouble around
    it (I/O errors, lack of memory, interrupts, anything unrecognised)."""
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError)):
        return True
    if isinstance(error, KeyError):
        return "was not found in the checkpoint" in str(error)
    if type(error) is ValueError:
        return str(error).startswith(_CORRUPT_STATUSES)
    return False


def _first_line(error: BaseException) -> str:
    text = (str(error).splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _unused(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... whichever does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


class Checkpointer:
    """A run's checkpoint policy, as a loop hook: a checkpoint at the end of every epoch (with
    its validation metrics, for ranking), every ``--checkpoint_every_steps`` steps at the
    next dispatch boundary, and at once when the loop is stopping; each holds the state and
    the metadata of where training stands (``event.progress.to_meta``)."""

    def __init__(self, workdir: Path, config, started: float, data: dict | None = None):
        self.checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints,
                                       monitor=config.monitor)
        self.config = config.to_dict()
        self.data = data  # the run's DataSpec, as a dict: the images the model takes
        self.every = config.checkpoint_every_steps
        self.started = started
        self.last_saved = 0  # the start: the first save is at step N or the first after it

    def resume(self, template: TrainState) -> tuple[TrainState, dict] | None:
        """The newest checkpoint's state and metadata, or None (see
        :meth:`Checkpoints.restore_latest`)."""
        restored = self.checkpoints.restore_latest(template, self.config)
        if restored is not None:
            saved = restored[1].get("data")
            if saved is not None and self.data is not None and saved != self.data:
                raise UserError(
                    f"{self.checkpoints.directory} holds a run on other data ({saved['name']}, "
                    f"images {tuple(saved['image_shape'])}, {len(saved['class_names'])} "
                    f"classes, or other pixel statistics) than this one ({self.data['name']}, "
                    f"{tuple(self.data['image_shape'])}, {len(self.data['class_names'])}); "
                    "use --fresh to start over (the old checkpoints are moved aside) or "
                    "another --workdir")
            self.last_saved = int(restored[0].step)
        return restored

    def restore_variables(self, step: int, template: dict) -> dict:
        """The inference variables (``{"params", "model_state"}``, or their moving averages
        with ``ema``) of checkpoint ``step``."""
        part = "ema" if self.config["ema_decay"] > 0 else None
        restored, _ = self.checkpoints.restore(step, {part: template} if part else template,
                                               partial=True)
        return restored[part] if part else restored

    def _save(self, event, metrics: dict | None = None) -> None:
        meta = {"config": self.config, "data": self.data,
                **event.progress.to_meta(self.started)}
        self.checkpoints.save(event.state, meta, metrics=metrics)
        self.last_saved = int(event.state.step)

    def after_dispatch(self, event) -> None:
        step = int(event.state.step)
        due = self.every and step // self.every > self.last_saved // self.every
        if event.stopping or (due and not event.at_epoch_end):  # epoch ends: saved anyway
            self._save(event)
        if event.stopping:
            self.checkpoints.wait()

    def after_epoch(self, event) -> None:
        record = event.record
        metrics = None if "val_accuracy" not in record else {
            "val_accuracy": record["val_accuracy"], "val_loss": record["val_loss"],
            "step": record["step"]}
        self._save(event, metrics)
        if event.stopping:
            self.checkpoints.wait()

    def set_aside_from(self, step: int) -> str:
        """Sets aside every checkpoint from ``step`` on (their parameters gave a non-finite
        loss); returns what is kept, in words."""
        self.checkpoints.wait()
        for bad in [s for s in self.checkpoints.steps() if s >= step]:
            self.checkpoints.set_aside(bad, "nonfinite")
        saved = self.checkpoints.steps()
        return (f"the last good checkpoint (step {saved[-1]}) is kept in "
                f"{self.checkpoints.directory}" if saved else "no checkpoint had been saved yet")

    def close(self) -> None:
        self.checkpoints.close()


def check_compatible(saved: dict, current: dict, where: Path) -> None:
    """Raises a UserError naming every field in which a checkpoint's config differs."""
    arch = [k for k in ARCHITECTURE if saved.get(k) != current.get(k)]
    if arch:
        diffs = ", ".join(f"--{k}={_show(saved.get(k))} there, {_show(current.get(k))} here"
                          for k in arch)
        raise UserError(f"checkpoint {where} is of another model ({diffs}); use --fresh to "
                        "start over (the old checkpoints are moved aside) or another --workdir")
    other = [k for k in sorted(set(saved) | set(current))
             if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]
    if other:
        diffs = ", ".join(f"--{k}={_show(saved.get(k))} there, {_show(current.get(k))} here"
                          for k in other)
        raise UserError(f"this workdir holds a run with other settings ({diffs}); to resume "
                        "it repeat its settings, or use --fresh to start over (the old "
                        "checkpoints are moved aside), or choose another --workdir")


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def move_aside(workdir: Path) -> Path | None:
    """``--fresh``: moves everything of the previous run (checkpoints, metrics, plots,
    evaluations) into ``<workdir>/previous-<time>/``; nothing is deleted. Returns that
    directory, or None when there was nothing."""
    present = [p for p in workdir.iterdir()
               if p.name != ".lock" and not p.name.startswith("previous-")]
    if not present:
        return None
    target = _unused(workdir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
    target.mkdir()
    for path in present:
        shutil.move(str(path), str(target / path.name))
    return target
