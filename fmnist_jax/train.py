"""The training run: ``fit(config)``, ``train_and_evaluate(config, workdir)``, and the CLI.

    python -m fmnist_jax.train --model=cnn          # or: fmnist-train --model=cnn

Each epoch trains on the training split and evaluates on the validation split; at the end
the test split is evaluated once (with the best weights when early stopping is on). With a
workdir, the run writes ``config.json``, ``metrics.jsonl`` (one line per epoch),
``summary.json`` and Orbax checkpoints there, and a run started again on the same workdir
resumes exactly where the last one stopped. SIGINT (Ctrl-C) or SIGTERM finishes the current
dispatch of steps, writes a checkpoint and exits; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import resource
import shlex
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fmnist_jax import adapt, files
from fmnist_jax import metrics as metrics_lib
from fmnist_jax.augment import Augment
from fmnist_jax import parallel
from fmnist_jax.checkpoints import Checkpoints, WorkdirLock, move_aside
from fmnist_jax.cli import parse_config, quiet_library_logs
from fmnist_jax.config import Config, monitor_sign
from fmnist_jax.data import CLASS_NAMES, Dataset, cache_dir, load_dataset
from fmnist_jax.errors import UserError
from fmnist_jax.inference import Classifier
from fmnist_jax.input_pipeline import DeviceResident, TfdsStream, local_idx_dir
from fmnist_jax.parallel import Devices
from fmnist_jax.models import create_model
from fmnist_jax.optim import make_optimizer, make_schedule
from fmnist_jax.steps import (LossFn, Steps, TrainState, create_train_state,
                              inference_variables, make_loss, make_steps, normalize)


class Preempted(UserError):
    """Training stopped by a signal after saving a checkpoint."""

    def __init__(self, message: str, signum: int, workdir=None):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.workdir = workdir


@dataclasses.dataclass
class Result:
    """What :func:`fit` returns."""

    state: TrainState  # the training state whose weights the summary reports
    graphdef: nnx.GraphDef
    history: list[dict]  # one record per epoch, as in metrics.jsonl
    summary: dict  # as in summary.json
    steps: Steps  # the jitted step functions, for further evaluation
    config: Config

    @functools.cached_property
    def classifier(self) -> Classifier:
        """The run's model (the weights the summary's test accuracy was measured with),
        ready to classify raw images."""
        return Classifier(self.graphdef, inference_variables(self.state),
                          self.config.eval_batch_size, self.config.dtype,
                          self.summary["checkpoint_step"], "the run's model")

    @property
    def model(self) -> nnx.Module:
        """The run's model as an ``nnx.Module``."""
        return self.classifier.model

    def predict(self, images) -> np.ndarray:
        """Class probabilities ``(N, 10)`` for uint8 (or 0-255) images ``(N, 28, 28[, 1])``."""
        return self.classifier.predict(images)


@dataclasses.dataclass
class _Position:
    """Where training stands: the epoch in progress, steps done in it, its running sums."""

    epoch: int = 1
    step_in_epoch: int = 0
    loss_sum: float = 0.0
    accuracy_sum: float = 0.0
    wall_time_s: float = 0.0  # spent by earlier processes of this run
    stopped_early: bool = False


class _Monitor:
    """Early stopping: the best epoch by the monitored metric, and a copy of its state."""

    def __init__(self, config: Config):
        self.key = config.monitor
        self.sign = monitor_sign(config.monitor)
        self.patience = config.patience
        self.best_value = -float("inf")
        self.best_epoch = 0
        self.best_step = 0
        self.best_state: TrainState | None = None

    def update(self, epoch: int, record: dict, state: TrainState) -> bool:
        """Returns True when training should stop."""
        value = self.sign * record[self.key]
        if value > self.best_value:
            self.best_value, self.best_epoch, self.best_step = value, epoch, record["step"]
            if self.patience:
                self.best_state = jax.tree.map(jnp.copy, state)  # ``state`` gets donated
        return bool(self.patience) and epoch - self.best_epoch >= self.patience

    def to_dict(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch,
                "best_step": self.best_step}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM outside the training loop (set-up, data loading, final test)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopOnSignal:
    """SIGINT/SIGTERM handling. While ``armed`` (in the training loop) the first signal asks
    the loop to checkpoint and stop, and a second one exits at once; outside the loop there
    is nothing to save, and a signal raises :class:`Interrupted` right away."""

    def __init__(self):
        self.enabled = threading.current_thread() is threading.main_thread()
        self.armed = False
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.armed:
            if _in_gc_callback(frame):  # an exception there is printed and ignored
                signal.raise_signal(signum)  # handled again once the callback returns
                return
            raise Interrupted(signum)
        if self.signum is not None:
            print(f"\n{signal.Signals(signum).name} again: exiting now", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after the current step, "
              "then stopping (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _in_gc_callback(frame) -> bool:
    """Whether ``frame`` runs inside a garbage-collector callback (JAX registers one)."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _make_pipeline(config: Config, data: Dataset | None, data_key: jax.Array,
                   devices: Devices):
    if config.data_source == "tfds" and data is None:
        return TfdsStream(devices=devices, batch_size=config.batch_size,
                          eval_batch_size=config.eval_batch_size,
                          validation_size=config.validation_size, seed=config.seed,
                          data_dir=config.data_dir or None, manual_dir=local_idx_dir())
    if data is None:
        data = load_dataset(config.data_dir or None, config.validation_size)
    return DeviceResident(data.train, {"validation": data.validation, "test": data.test},
                          devices=devices, batch_size=config.batch_size,
                          eval_batch_size=config.eval_batch_size,
                          steps_per_dispatch=config.steps_per_dispatch, rng=data_key)


def _initial_state(config: Config, optimizer, keys: dict, devices: Devices
                   ) -> tuple[nnx.GraphDef, TrainState]:
    """The named model and its optimizer state, built by one compiled program (one
    compilation-cache lookup at start-up instead of dozens for eager ops) straight onto
    every device. The values are bitwise those of building them eagerly."""
    graphdefs = []

    def build(keys):
        model = create_model(config.model, rngs=nnx.Rngs(params=keys["params"],
                                                         dropout=keys["dropout"]),
                             **config.model_kwargs())
        graphdef, state = create_train_state(model, optimizer, keys["augment"],
                                             ema=config.ema_decay > 0)
        graphdefs.append(graphdef)  # static: recorded while tracing
        return state

    state = jax.jit(build, out_shardings=devices.replicated)(keys)
    return graphdefs[0], state


def _user_state(model, config: Config, optimizer, keys: dict, sample: np.ndarray,
                devices: Devices) -> tuple[nnx.GraphDef, TrainState]:
    """A model of the caller's (NNX or Linen) and its optimizer state, on every device."""
    work = adapt.prepare(model, normalize(sample),
                         nnx.Rngs(params=keys["params"], dropout=keys["dropout"]))
    graphdef, state = create_train_state(work, optimizer, keys["augment"],
                                         ema=config.ema_decay > 0)
    return graphdef, devices.replicate(state)


def _learning_rate(schedule: Callable | None, state: TrainState) -> float | None:
    if schedule is not None:
        return float(schedule(state.step))
    found = optax.tree_utils.tree_get(state.opt_state, "learning_rate")  # inject_hyperparams
    return None if found is None else float(found)


def fit(config: Config = Config(), *, model: nnx.Module | None = None,
        optimizer: optax.GradientTransformation | None = None, loss_fn: LossFn | None = None,
        data: Dataset | None = None, workdir: str | None = None) -> Result:
    """Trains and evaluates; returns the trained state, the history and a summary.

    ``model``, ``optimizer`` and ``loss_fn`` replace the named ones of ``config``: any
    ``flax.nnx.Module`` called as ``model(x)`` with modes set by ``model.train()`` /
    ``model.eval()`` (dropout keys from its own ``nnx.Rngs``), or a ``flax.linen.Module``
    (:mod:`fmnist_jax.adapt`); any optax transformation; any ``loss_fn(logits, labels) ->
    per-example loss``. Training works on a copy of an NNX ``model``, which at the end
    receives the run's model (the weights the summary reports) in eval mode. ``data``
    replaces loading Fashion-MNIST. ``workdir`` (default ``config.workdir``; empty writes
    nothing) receives the run's files and checkpoints; if it holds checkpoints of the same
    run, training resumes from them.
    """
    config.validate()
    if config.compilation_cache:
        enable_compilation_cache()
    devices = parallel.setup(config.distributed)
    workdir = workdir if workdir is not None else config.workdir
    out = metrics_lib.prepare_workdir(workdir) if workdir else None
    lock = WorkdirLock(out) if out and parallel.is_main_process() else None
    debug_nans = jax.config.jax_debug_nans
    jax.config.update("jax_debug_nans", debug_nans or config.debug_nans)
    try:
        return _fit(config, model, optimizer, loss_fn, data, out, devices)
    finally:
        jax.config.update("jax_debug_nans", debug_nans)
        if lock:
            lock.release()


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in the package's cache directory: a second run of
    the same program skips XLA compilation."""
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _process_age() -> float:
    """Seconds since this process started (what a user waits for)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or no /proc: count from import
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def _log(*args) -> None:
    """Prints on process 0 only."""
    if parallel.is_main_process():
        print(*args, flush=True)


def _fit(config, model, optimizer, loss_fn, data, out, devices: parallel.Devices) -> Result:
    started = time.perf_counter()
    writes = out is not None and parallel.is_main_process()  # metrics files, plots
    keys = dict(zip(("params", "dropout", "augment", "data"),
                    jax.random.split(jax.random.key(config.seed), 4)))
    with _StopOnSignal() as stop:
        pipeline = _make_pipeline(config, data, keys["data"], devices)
        steps_per_epoch = pipeline.steps_per_epoch
        custom = {name: value for name, given, value in (
            ("model", model, model is not None and adapt.describe(model)),
            ("optimizer", optimizer, "custom"), ("loss", loss_fn, "custom")) if given is not None}
        model_name = custom.get("model", config.model)
        schedule = None
        if optimizer is None:
            schedule = make_schedule(config.schedule, config.learning_rate,
                                     config.epochs * steps_per_epoch, steps_per_epoch,
                                     warmup_epochs=config.warmup_epochs,
                                     decay_rate=config.decay_rate)
            optimizer = make_optimizer(config.optimizer, schedule, momentum=config.momentum,
                                       nesterov=config.nesterov,
                                       weight_decay=config.weight_decay,
                                       clip_grad_norm=config.clip_grad_norm)
        loss_fn = loss_fn or make_loss(config.loss, config.label_smoothing)
        sample = pipeline.split("test").images[:2]
        if model is None:
            graphdef, state = _initial_state(config, optimizer, keys, devices)
        else:
            graphdef, state = _user_state(model, config, optimizer, keys, sample, devices)
        adapt.check(graphdef, (state.params, state.rngs, state.model_state), normalize(sample))
        num_params = sum(x.size for x in jax.tree.leaves(state.params))
        steps = make_steps(graphdef, optimizer, loss_fn, replicated=devices.replicated,
                           dtype=jnp.dtype(config.dtype), ema_decay=config.ema_decay,
                           augment=Augment(config.random_crop, config.random_flip,
                                           config.random_erasing) or None)

        trained_with = ("custom optimizer" if "optimizer" in custom else
                        f"{config.optimizer} lr {config.learning_rate:g} {config.schedule}")
        _log(f"fmnist_jax: {model_name} ({num_params:,} parameters), {trained_with}"
             f"{', custom loss' if 'loss' in custom else ''}, {config.epochs} epochs of "
             f"{steps_per_epoch} steps x {config.batch_size}, on {devices.count} "
             f"{jax.default_backend()} device(s)" + (f"; writing to {out}" if out else ""))
        position, history, monitor = _Position(), [], _Monitor(config)
        ckpt, writers = None, []
        if out:
            if config.fresh and writes and (moved := move_aside(out)):
                _log(f"--fresh: moved the previous run's files to {moved}")
            parallel.sync("fresh")
            ckpt = Checkpoints(out, keep=config.keep_checkpoints, monitor=config.monitor)
            state, position, history = _resume(ckpt, state, config, monitor, steps_per_epoch)
        if writes:
            files.write_json(out / "config.json",
                             {**config.to_dict(), **({"custom": custom} if custom else {})})
            files.write_jsonl(out / "metrics.jsonl", history)
            writers.append(metrics_lib.JsonlWriter(out / "metrics.jsonl", append=True))
            if config.tensorboard:
                writers.append(metrics_lib.TensorBoardWriter(out / "tensorboard"))

        def meta() -> dict:
            return {"config": config.to_dict(), "epoch": position.epoch,
                    "step_in_epoch": position.step_in_epoch, "loss_sum": position.loss_sum,
                    "accuracy_sum": position.accuracy_sum, "history": history,
                    "monitor": monitor.to_dict(), "stopped_early": position.stopped_early,
                    "wall_time_s": position.wall_time_s + time.perf_counter() - started}

        timings = {"training_starts_s": _process_age()}

        def after_dispatch(state: TrainState, sums: dict, last_saved: list[int]) -> None:
            if (bad := int(sums["first_nonfinite"])) >= 0:
                raise UserError(_set_aside_nonfinite(bad, position.epoch, config, ckpt))
            timings.setdefault("first_dispatch_done_s", _process_age())
            step = int(state.step)
            every = config.checkpoint_every_steps
            at_epoch_end = position.step_in_epoch == steps_per_epoch  # saved there anyway
            if ckpt and every and not at_epoch_end and step // every > last_saved[0] // every:
                ckpt.save(state, meta())
                last_saved[0] = step
            if stop.signum is not None and not at_epoch_end:
                if ckpt:
                    ckpt.save(state, meta())
                    ckpt.wait()
                raise Preempted(_stopped_message(out, position, steps_per_epoch, step),
                                stop.signum, out)

        throughput: list[float] = []
        stop.armed = True
        try:
            while position.epoch <= config.epochs and not position.stopped_early:
                epoch = position.epoch
                state, seconds, done = _train_one_epoch(
                    pipeline, steps, state, config, steps_per_epoch, position, after_dispatch)
                record = {"epoch": epoch, "step": int(state.step),
                          "learning_rate": _learning_rate(schedule, state),
                          "train_loss": position.loss_sum / steps_per_epoch,
                          "train_accuracy": position.accuracy_sum / steps_per_epoch,
                          "epoch_time_s": seconds,
                          "images_per_s": done * config.batch_size / seconds}
                throughput.append(record["images_per_s"])
                if pipeline.has_validation:
                    val, _ = _evaluate(pipeline, state, "validation", steps)
                    record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
                if config.test_every_epoch:
                    test, _ = _evaluate(pipeline, state, "test", steps)
                    record.update(test_loss=test["loss"], test_accuracy=test["accuracy"],
                                  process_age_s=_process_age())
                record["wall_time_s"] = (position.wall_time_s + time.perf_counter()
                                         - started)
                history.append(record)
                position.stopped_early = (pipeline.has_validation and
                                          monitor.update(epoch, record, state))
                position.epoch, position.step_in_epoch = epoch + 1, 0
                position.loss_sum = position.accuracy_sum = 0.0
                if ckpt:
                    ckpt.save(state, meta(), metrics=_checkpoint_metrics(record))
                for writer in writers:
                    writer.write(record)
                _print_epoch(record, config.epochs)
                if position.stopped_early:
                    _log(f"early stopping: no {config.monitor} improvement for "
                         f"{config.patience} epochs; restoring epoch {monitor.best_epoch}")
                if stop.signum is not None and position.epoch <= config.epochs:
                    if ckpt:
                        ckpt.wait()
                    raise Preempted(_stopped_message(out, position, steps_per_epoch,
                                                     int(state.step)), stop.signum, out)
        finally:
            stop.armed = False
            for writer in writers:
                writer.close()
            if ckpt:
                ckpt.close()

        final_val = history[-1] if history else None
        if monitor.patience and monitor.best_state is not None:
            state = monitor.best_state
            final_val = history[monitor.best_epoch - 1]
        if final_val is None and pipeline.has_validation:  # no epoch trained
            val, _ = _evaluate(pipeline, state, "validation", steps)
            final_val = {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        test, test_logits = _evaluate(pipeline, state, "test", steps)
    summary = {
        "model": model_name,
        "optimizer": custom.get("optimizer", config.optimizer),
        "loss": custom.get("loss", config.loss),
        "num_params": num_params,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_count": test["count"],
        "val_accuracy": final_val.get("val_accuracy") if final_val else None,
        "val_loss": final_val.get("val_loss") if final_val else None,
        "train_accuracy": history[-1]["train_accuracy"] if history else None,
        "epochs": len(history),
        "best_epoch": monitor.best_epoch if monitor.patience else len(history),
        "steps": history[-1]["step"] if history else int(state.step),
        # The weights this summary's test and validation figures were measured with:
        # those of this step (the best epoch's under early stopping, else the last),
        # their moving average when --ema_decay > 0.
        "checkpoint_step": int(state.step),
        "weights": "ema" if state.ema is not None else "raw",
        "wall_time_s": position.wall_time_s + time.perf_counter() - started,
        "train_time_s": sum(r["epoch_time_s"] for r in history),
        # Steady state: the first epoch of a process includes compilation.
        "train_images_per_s": (statistics.median(throughput[1:] or throughput)
                               if throughput else None),
        **timings,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "num_devices": devices.count,
        "num_processes": jax.process_count(),
        "dtype": config.dtype,
        "jax_version": jax.__version__,
        "data_source": config.data_source,
    }
    _log(f"test: loss {test['loss']:.4f}, accuracy {100 * test['accuracy']:.2f}% "
         f"({test['count']} images); {summary['wall_time_s']:.1f} s in all")
    if writes:
        files.write_json(out / "summary.json", summary)
        if config.plots and history:
            _write_plots(out, history, pipeline.split("test"), test_logits, model_name)
    if isinstance(model, nnx.Module):  # the caller's module gets the run's model
        variables = inference_variables(state)
        nnx.update(model, variables["params"], variables["rngs"], variables["model_state"])
        model.eval()
    return Result(state, graphdef, history, summary, steps, config)


def _evaluate(pipeline, state: TrainState, split: str, steps: Steps
              ) -> tuple[dict, np.ndarray]:
    """Loss, accuracy and count of ``split`` with the state's inference weights, and the
    logits they were computed from."""
    logits = pipeline.evaluate(inference_variables(state), split, steps)
    return metrics_lib.classification(logits, pipeline.split(split).labels), logits


def _write_plots(out, history, test, logits: np.ndarray, title: str) -> None:
    """The plots, drawn from the test evaluation's logits (nothing is computed again)."""
    from fmnist_jax import plots

    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    names = plots.write_run_plots(out, history, test.images, test.labels, probabilities,
                                  CLASS_NAMES, title)
    _log(f"plots: {', '.join(str(out / n) for n in names)}")


def _checkpoint_metrics(record: dict) -> dict | None:
    if "val_accuracy" not in record:
        return None
    return {"val_accuracy": record["val_accuracy"], "val_loss": record["val_loss"],
            "step": record["step"]}


def _resume(ckpt: Checkpoints, state: TrainState, config: Config, monitor: _Monitor,
            steps_per_epoch: int) -> tuple[TrainState, _Position, list[dict]]:
    restored = ckpt.restore_latest(state, config.to_dict())
    if restored is None:
        return state, _Position(), []
    state, meta = restored
    position = _Position(meta["epoch"], meta["step_in_epoch"], meta["loss_sum"],
                         meta["accuracy_sum"], meta["wall_time_s"], meta["stopped_early"])
    m = meta["monitor"]
    monitor.best_value, monitor.best_epoch, monitor.best_step = (
        m["best_value"], m["best_epoch"], m["best_step"])
    if config.patience and monitor.best_epoch:
        monitor.best_state = (jax.tree.map(jnp.copy, state)
                              if monitor.best_step == int(state.step)
                              else ckpt.restore(monitor.best_step, state)[0])
    done = position.epoch > config.epochs or position.stopped_early
    _log(f"resuming from checkpoint {ckpt.directory / str(int(state.step))}: "
         + ("training is complete; evaluating" if done else
            f"epoch {position.epoch}, step {position.step_in_epoch} of {steps_per_epoch}"))
    return state, position, meta["history"]


def _stopped_message(out, position: _Position, steps_per_epoch: int, step: int) -> str:
    where = (f"stopped at step {step} (epoch {position.epoch}, step {position.step_in_epoch} "
             f"of {steps_per_epoch})")
    if out is None:
        return f"{where}; nothing was saved (no workdir)"
    return (f"{where}; checkpoint saved in {out / 'checkpoints'}. Run the same command "
            f"with --workdir={out} to resume")


def _set_aside_nonfinite(step: int, epoch: int, config: Config, ckpt) -> str:
    """Sets aside a checkpoint whose parameters gave the non-finite loss (the one saved at
    ``step``, if any), so the latest one left is good; returns the message to show."""
    kept = ""
    if ckpt:
        ckpt.wait()
        for bad in [s for s in ckpt.steps() if s >= step]:
            ckpt.set_aside(bad, "nonfinite")
        saved = ckpt.steps()
        kept = (f"; the last good checkpoint (step {saved[-1]}) is kept in {ckpt.directory}"
                if saved else "; no checkpoint had been saved yet")
    return (f"the training loss became NaN or infinite at step {step} (epoch {epoch}), so "
            f"training stopped there{kept}. Likely cause: a learning rate too high for this "
            f"model and optimizer (--learning_rate={config.learning_rate:g}); lower it, add "
            "--clip_grad_norm=1, or run with --debug_nans to find the first operation that "
            "makes a NaN")


def _train_one_epoch(pipeline, steps: Steps, state: TrainState, config: Config,
                     steps_per_epoch: int, position: _Position, after_dispatch
                     ) -> tuple[TrainState, float, int]:
    """Trains from ``position`` to the end of its epoch, updating ``position`` as it goes.

    Returns the state, the seconds spent and the number of steps run by this call.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    done = 0
    last_saved = [int(state.step)]
    with tqdm(total=steps_per_epoch, initial=position.step_in_epoch,
              desc=f"epoch {position.epoch}/{config.epochs}", unit="step",
              disable=not (config.progress and parallel.is_main_process()), leave=False,
              file=sys.stderr) as bar:
        for state, sums, n in pipeline.train_epoch(state, position.epoch, steps,
                                                   position.step_in_epoch):
            position.loss_sum += float(sums["loss"])  # one host sync per dispatch
            position.accuracy_sum += float(sums["accuracy"])
            position.step_in_epoch += n
            done += n
            bar.update(n)
            rate = done * config.batch_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{position.loss_sum / position.step_in_epoch:.4f}",
                            acc=f"{position.accuracy_sum / position.step_in_epoch:.4f}",
                            img_s=f"{rate:,.0f}")
            after_dispatch(state, sums, last_saved)
    return state, time.perf_counter() - start, done


def _print_epoch(r: dict, epochs: int) -> None:
    val = (f"  val loss {r['val_loss']:.4f} acc {100 * r['val_accuracy']:.2f}%"
           if "val_loss" in r else "")
    lr = f"  lr {r['learning_rate']:.2e}" if r.get("learning_rate") is not None else ""
    _log(f"epoch {r['epoch']:>3}/{epochs}  train loss {r['train_loss']:.4f} "
         f"acc {100 * r['train_accuracy']:.2f}%{val}{lr}  "
         f"{r['images_per_s']:,.0f} img/s  {r['epoch_time_s']:.1f} s")


def train_and_evaluate(config: Config, workdir: str) -> Result:
    """Trains with ``config``, writing the run's files and checkpoints into ``workdir``."""
    return fit(config, workdir=workdir)


def default_workdir(config: Config) -> str:
    return f"runs/{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    argv = sys.argv[1:] if argv is None else argv
    workdir = None
    try:
        config = parse_config(argv)
        workdir = config.workdir or default_workdir(config)
        train_and_evaluate(config, workdir)
    except Preempted as e:
        print(f"fmnist-train: {e}:\n  python -m fmnist_jax.train "
              f"{shlex.join(_with_workdir(argv, e))}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        print(f"fmnist-train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        saved = workdir is not None and (Path(workdir) / "checkpoints").is_dir() and any(
            p.name.isdigit() for p in (Path(workdir) / "checkpoints").iterdir())
        hint = (f"; the checkpoints in {workdir} are complete: run the same command with "
                f"--workdir={workdir} to go on" if saved else "; no training had been saved")
        print(f"fmnist-train: interrupted by {signal.Signals(signum).name} outside the "
              f"training loop{hint}", file=sys.stderr)
        return 128 + signum
    return 0


def _with_workdir(argv: list[str], e: Preempted) -> list[str]:
    """The command line to resume: the same flags, with the workdir made explicit."""
    args = [a for a in argv if not a.startswith("--fresh")]
    if e.workdir is None or any(a.startswith("--workdir") for a in args):
        return args
    return [*args, f"--workdir={e.workdir}"]


if __name__ == "__main__":
    sys.exit(main())
