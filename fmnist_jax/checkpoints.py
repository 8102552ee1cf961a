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

import dataclasses
import fcntl
import functools
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from fmnist_jax.errors import UserError
from fmnist_jax.steps import TrainState

# Config fields that may differ between a run and its resumption: they do not change what
# is computed.
RESUMABLE_CHANGES = frozenset({
    "workdir", "data_dir", "progress", "plots", "tensorboard", "fresh", "debug_nans",
    "compilation_cache", "checkpoint_every_steps", "keep_checkpoints", "distributed",
    "test_every_epoch"})
# Config fields that decide the shapes of the parameters.
ARCHITECTURE = ("model", "hidden", "features", "dense", "batch_norm", "blocks")


def to_saveable(state: TrainState) -> TrainState:
    return state.replace(rng=jax.random.key_data(state.rng))


def from_saveable(state: TrainState, template: TrainState) -> TrainState:
    """Key data back to a key of the template's PRNG implementation."""
    return state.replace(rng=jax.random.wrap_key_data(
        state.rng, impl=jax.random.key_impl(template.rng)))


class _QuietOrbax(logging.Filter):
    """Drops Orbax's notices about choices made here on purpose: mid-epoch checkpoints have
    no validation metrics, and evaluation opens the checkpoints read-only."""

    NOTICES = ("did not provide metrics", "read_only=True", "directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOTICES)


logging.getLogger("absl").addFilter(_QuietOrbax())


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
        if read_only and not self.directory.is_dir():
            raise UserError(f"{self.directory} does not exist: no checkpoints in this "
                            "workdir (train with --workdir first)")
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------ saving

    def save(self, state: TrainState, meta: dict, metrics: dict | None = None) -> None:
        """Saves in the background; the state may be donated right after this returns."""
        step = int(state.step)
        try:
            if step in self.manager.all_steps():  # the same step holds the same state
                return
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(to_saveable(state)),
                meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - disk full, permissions, ...
            raise self._save_error(e) from None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - errors of a background save surface here
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

    def restore(self, step: int, template: TrainState) -> tuple[TrainState, dict]:
        """Restores ``step`` into the structure of ``template`` (shapes must match)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, to_saveable(template))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except ValueError as e:
            if "do not match" in str(e) or "shape" in str(e).lower():
                raise UserError(
                    f"checkpoint {self.directory / str(step)} does not fit this model: "
                    f"{str(e).splitlines()[0]} Use --fresh to start over (the old "
                    "checkpoints are moved aside) or another --workdir") from None
            raise
        return from_saveable(restored.state, template), restored.meta

    def restore_latest(self, template: TrainState, config: dict
                       ) -> tuple[TrainState, dict] | None:
        """The newest checkpoint that restores, or None when there is none.

        A checkpoint that cannot be read is moved to ``checkpoints.corrupt/`` with a
        warning, and the previous one is tried. A checkpoint of another configuration is
        refused with a message naming the differences.
        """
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
                check_compatible(meta["config"], config, self.directory / str(step))
                return self.restore(step, template)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable file means corrupt
                first_line = (str(e).splitlines() or [""])[0][:200]
                target = self.set_aside(step, "corrupt")
                _warn(f"checkpoint {self.directory / str(step)} is unreadable "
                      f"({type(e).__name__}: {first_line}); moved it to {target} and trying "
                      "the previous one")
        return None

    def set_aside(self, step: int, why: str) -> Path:
        """Moves checkpoint ``step`` to ``checkpoints.<why>/`` (nothing is deleted)."""
        self.wait()
        source = self.directory / str(step)
        target = self.directory.parent / f"checkpoints.{why}" / f"{step}-{int(time.time())}"
        target.parent.mkdir(exist_ok=True)
        shutil.move(str(source), str(target))
        self.manager.reload()
        return target


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
    target = workdir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir()
    for path in present:
        shutil.move(str(path), str(target / path.name))
    return target


# ---------------------------------------------------------------------- loading a model

@dataclasses.dataclass
class Loaded:
    """A trained state restored from a workdir, ready for inference."""

    graphdef: object
    state: TrainState
    config: object  # fmnist_jax.Config
    step: int

    @property
    def model(self):
        """The trained ``nnx.Module`` (in inference use: call with ``train=False``)."""
        from flax import nnx

        return nnx.merge(self.graphdef, self.state.params, self.state.model_state)

    @functools.cached_property
    def _predict(self):
        from fmnist_jax.steps import predict_logits

        return jax.jit(functools.partial(predict_logits, graphdef=self.graphdef))

    def predict_logits(self, images) -> jax.Array:
        """Logits for uint8 images ``(N, 28, 28[, 1])``."""
        images = jax.numpy.asarray(images, jax.numpy.uint8)
        if images.ndim == 3:
            images = images[..., None]
        return self._predict(self.state, images)


def load_state(workdir: str | os.PathLike, checkpoint: str | int = "best", *, model=None,
               optimizer=None) -> Loaded:
    """Restores a checkpoint of ``workdir``: ``best`` (by the run's monitored validation
    metric), ``latest``, or a step number.

    The model and optimizer are rebuilt from the checkpoint's config; a run trained with
    your own module or optax transformation needs them passed again (untrained is fine:
    only their structure is used).
    """
    import optax
    from flax import nnx

    from fmnist_jax.config import Config
    from fmnist_jax.models import create_model
    from fmnist_jax.optim import make_optimizer
    from fmnist_jax.steps import create_train_state

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"--workdir={workdir} does not exist")
    monitor = "val_accuracy"
    if (workdir / "config.json").is_file():
        monitor = json.loads((workdir / "config.json").read_text()).get("monitor", monitor)
    ckpt = Checkpoints(workdir, monitor=monitor, read_only=True)
    steps = ckpt.steps()
    if not steps:
        raise UserError(f"{ckpt.directory} holds no checkpoint yet")
    if checkpoint == "latest":
        step = steps[-1]
    elif checkpoint == "best":
        step = ckpt.best_step() or steps[-1]
    else:
        try:
            step = int(checkpoint)
        except ValueError:
            raise UserError(f"--checkpoint={checkpoint} must be best, latest or a step number")
        if step not in steps:
            raise UserError(f"--checkpoint={step} is not in {ckpt.directory}; it holds steps "
                            f"{', '.join(map(str, steps))}")
    config = Config.from_dict(ckpt.read_meta(step)["config"])
    if model is None:
        model = create_model(config.model, rngs=nnx.Rngs(0), **config.model_kwargs())
    if optimizer is None:
        optimizer = make_optimizer(config.optimizer, optax.constant_schedule(1.0),
                                   momentum=config.momentum, nesterov=config.nesterov,
                                   weight_decay=config.weight_decay,
                                   clip_grad_norm=config.clip_grad_norm)
    graphdef, template = create_train_state(model, optimizer, jax.random.key(0),
                                            ema=config.ema_decay > 0)
    state, _ = ckpt.restore(step, template)
    ckpt.manager.close()
    return Loaded(graphdef, state, config, step)
