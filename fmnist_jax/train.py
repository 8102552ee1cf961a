"""The training run: ``fit(config)``, ``train_and_evaluate(config, workdir)``, and the CLI.

    python -m fmnist_jax.train --model=cnn          # or: fmnist-train --model=cnn

``fit`` is the recipe, in the order a reader expects: build the run's parts
(:mod:`fmnist_jax.build`), resume from the workdir's checkpoints, train epoch by epoch
(:class:`fmnist_jax.loop.Trainer` with its hooks: the
:class:`~fmnist_jax.checkpoints.Checkpointer`, the :class:`~fmnist_jax.report.Reporter` and
the stop check), then evaluate the run's model
on the test split once and write the summary. With a workdir, the run writes
``config.json``, ``metrics.jsonl`` (one line per epoch), ``summary.json``, plots and Orbax
checkpoints there, and a run started again on the same workdir resumes exactly where the
last one stopped. SIGINT (Ctrl-C, a notebook's interrupt) or SIGTERM finishes the current
dispatch of steps, writes a checkpoint and raises ``KeyboardInterrupt``
(:class:`~fmnist_jax.loop.Preempted`); a second one raises at once. ``fit`` restores the
process's signal handlers when it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import resource
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from fmnist_jax import adapt, parallel
from fmnist_jax import callbacks as callbacks_lib
from fmnist_jax.build import Built, build
from fmnist_jax.callbacks import Profiler, check_callbacks
from fmnist_jax.checkpoints import Checkpointer, WorkdirLock, move_aside, quiet_orbax
from fmnist_jax.cli import output_pipe_closed, parse_config, quiet_library_logs
from fmnist_jax.config import Config
from fmnist_jax.data import DataSpec, Dataset
from fmnist_jax.errors import UserError
from fmnist_jax.inference import Classifier
from fmnist_jax.loop import (Interrupted, NonFiniteLoss, Preempted, Progress, StopSignal,
                             Trainer, evaluate)
from fmnist_jax.metrics import prepare_workdir, remove_if_unused
from fmnist_jax.report import Reporter, log, process_age
from fmnist_jax.steps import LossFn, Steps, TrainState, inference_variables
from fmnist_jax.tuning import enable_compilation_cache, tune_command_line

__all__ = ["Interrupted", "Preempted", "Result", "enable_compilation_cache", "fit", "main",
           "train_and_evaluate"]


@dataclasses.dataclass
class Result:
    """What :func:`fit` returns."""

    state: TrainState  # the training state at the end (resumable)
    graphdef: nnx.GraphDef
    variables: dict  # the run's model: the weights the summary reports
    history: list[dict]  # one record per epoch, as in metrics.jsonl
    summary: dict  # as in summary.json
    steps: Steps  # the jitted step functions, for further evaluation
    config: Config
    spec: DataSpec = DataSpec()  # the data's image shape, classes and pixel statistics

    @functools.cached_property
    def classifier(self) -> Classifier:
        """The run's model, ready to classify raw images."""
        return Classifier(self.graphdef, self.variables, self.config.eval_batch_size,
                          self.summary["checkpoint_step"],
                          "the run's model", self.config.tta_flip, self.config.tta_shift,
                          self.spec)

    @property
    def model(self) -> nnx.Module:
        """The run's model as an ``nnx.Module``, in eval mode."""
        return self.classifier.model

    def predict(self, images) -> np.ndarray:
        """Class probabilities ``(N, K)`` for images as the run's data had them (Fashion-MNIST:
        uint8, or 0-255, ``(N, 28, 28[, 1])``)."""
        return self.classifier.predict(images)


def fit(config: Config = Config(), *, model: nnx.Module | None = None,
        optimizer: optax.GradientTransformation | None = None, loss_fn: LossFn | None = None,
        data: Dataset | None = None, workdir: str | None = None,
        callbacks: Sequence = ()) -> Result:
    """Trains and evaluates; returns the run's model, the history and a summary.

    ``model``, ``optimizer`` and ``loss_fn`` replace the named ones of ``config``: any
    ``flax.nnx.Module`` called as ``model(x)`` with modes set by ``model.train()`` /
    ``model.eval()`` (dropout keys from its own ``nnx.Rngs``), or a ``flax.linen.Module``
    (:mod:`fmnist_jax.adapt`); any optax transformation; any ``loss_fn(logits, labels) ->
    per-example loss``. Training works on a copy of an NNX ``model``, which at the end
    receives the run's model (the weights the summary reports) in eval mode. ``data``
    replaces loading Fashion-MNIST. ``workdir`` (default ``config.workdir``; empty writes
    nothing) receives the run's files and checkpoints; if it holds checkpoints of the same
    run, training resumes from them. ``callbacks``: objects with any of Keras's
    ``on_train_begin``, ``on_epoch_begin``, ``on_epoch_end`` and ``on_train_end``
    (:mod:`fmnist_jax.callbacks`); one may raise :class:`~fmnist_jax.callbacks.StopTraining`.
    """
    workdir = _checked(config, workdir, callbacks)
    started = time.perf_counter()
    with _jax_settings(config), quiet_orbax(), StopSignal() as stop:
        devices = parallel.setup(config.distributed)
        config = config.for_backend(jax.default_backend())
        created = bool(workdir) and not Path(workdir).expanduser().exists()
        out = prepare_workdir(workdir) if workdir else None
        with _removed_if_unused(out if created else None), WorkdirLock.held(out):
            built = build(config, devices, model=model, optimizer=optimizer,
                          loss_fn=loss_fn, data=data)
            reporter = Reporter(out, config)
            checkpointer = _checkpointer(out, config, started, built.spec)
            try:
                reporter.start(built.describe(config, devices), built.pipeline.steps_per_epoch)
                state, progress = _resume(checkpointer, built.state, config)
                reporter.open(progress, built.custom, built.spec)
                profiler = (Profiler(out / "profile", config.profile_steps)
                            if config.profile_steps else None)
                hooks = [h for h in (checkpointer, reporter, profiler,
                                     _StopCheck(out, built, stop)) if h]
                trainer = Trainer(built, config, hooks, stop, started,
                                  keep_best=bool(config.patience) and checkpointer is None,
                                  callbacks=callbacks)
                state = _train(trainer, state, progress, checkpointer, profiler)
            except BaseException:
                reporter.abandon()
                if checkpointer:
                    with contextlib.suppress(Exception):  # the first error is the one to tell
                        checkpointer.close()  # the checkpoint being written is completed
                raise
            reporter.close()
            _close(checkpointer, stop, out)
            result = _finish(built, config, state, progress, trainer, reporter, started,
                             checkpointer)
    if isinstance(model, nnx.Module):  # the caller's module gets the run's model
        adapt.give_back(model, result.variables)
    callbacks_lib.call(callbacks, "on_train_end", dict(result.summary))
    return result


def _checked(config: Config, workdir: str | None, callbacks: Sequence) -> str:
    """The run's workdir, once the config and the callbacks passed their checks."""
    config.validate()
    check_callbacks(callbacks)
    workdir = workdir if workdir is not None else config.workdir
    if config.profile_steps and not workdir:
        raise UserError("--profile_steps writes its trace into the workdir: give --workdir "
                        "(fit(..., workdir=...))")
    return workdir


@contextlib.contextmanager
def _removed_if_unused(created: Path | None):
    """A workdir this run created is removed again if the run fails before writing to it
    (data not found, a bad model): no empty run folder is left behind."""
    try:
        yield
    except BaseException:
        if created is not None and parallel.is_main_process():
            remove_if_unused(created)
        raise


@contextlib.contextmanager
def _jax_settings(config: Config):
    """JAX's NaN checks for the run (``--debug_nans``), restored afterwards."""
    saved = jax.config.jax_debug_nans
    jax.config.update("jax_debug_nans", saved or config.debug_nans)
    try:
        yield
    finally:
        jax.config.update("jax_debug_nans", saved)


def _checkpointer(out: Path | None, config: Config, started: float, spec: DataSpec
                  ) -> Checkpointer | None:
    if out is None:
        return None
    if config.fresh and parallel.is_main_process() and (moved := move_aside(out)):
        log(f"--fresh: moved the previous run's files to {moved}")
    parallel.sync("fresh")
    return Checkpointer(out, config, started, spec.to_dict())


def _resume(checkpointer: Checkpointer | None, state: TrainState, config: Config
            ) -> tuple[TrainState, Progress]:
    """The newest checkpoint's state and progress, or the initial ones."""
    restored = checkpointer.resume(state) if checkpointer else None
    if restored is None:
        return state, Progress.start(config)
    state, meta = restored
    try:
        progress = Progress.from_meta(meta, config)
    except (KeyError, TypeError):
        raise UserError(f"{checkpointer.checkpoints.directory} holds checkpoints of an older "
                        "fmnist_jax; use --fresh to start over (they are moved aside) or "
                        "another --workdir") from None
    log(f"resuming from checkpoint {checkpointer.checkpoints.directory / str(int(state.step))}"
        f": " + ("training is complete; evaluating" if progress.finished else
                 f"epoch {progress.epoch}, step {progress.step_in_epoch}"))
    return state, progress


def _train(trainer: Trainer, state: TrainState, progress: Progress,
           checkpointer: Checkpointer | None, profiler: Profiler | None) -> TrainState:
    """The loop; a non-finite loss sets its checkpoints aside and stops with one line; a
    trace still running ends with it."""
    try:
        return trainer.run(state, progress)
    except NonFiniteLoss as e:
        kept = (checkpointer.set_aside_from(e.step) if checkpointer
                else "nothing was saved (no workdir)")
        raise UserError(
            f"the training loss became NaN or infinite at step {e.step} (epoch {e.epoch}), "
            f"so training stopped there; {kept}. Likely cause: a learning rate too high for "
            f"this model and optimizer (--learning_rate={trainer.config.learning_rate:g}); "
            "lower it, add --clip_grad_norm=1, or run with --debug_nans to find the first "
            "operation that makes a NaN") from None
    finally:
        if profiler:
            profiler.close()


def _close(checkpointer: Checkpointer | None, stop: StopSignal, out: Path | None) -> None:
    """Waits for the last checkpoint, a signal meanwhile stopping after it."""
    if checkpointer is None:
        return
    stop.armed = True
    try:
        checkpointer.close()
    finally:
        stop.armed = False
    if stop.signum is not None:
        raise Preempted(f"stopped after training; every checkpoint is saved in "
                        f"{out / 'checkpoints'}. Run the same command with --workdir={out} "
                        "to evaluate", stop.signum, out)


class _StopCheck:
    """The last hook: once the checkpointer has saved, a stop signal ends the run."""

    def __init__(self, out: Path | None, built: Built, stop: StopSignal):
        self.out, self.built, self.stop = out, built, stop

    def after_dispatch(self, event) -> None:
        if event.stopping:
            self._stop(event)

    after_epoch = after_dispatch

    def _stop(self, event) -> None:
        p = event.progress
        where = (f"stopped at step {int(event.state.step)} (epoch {p.epoch}, step "
                 f"{p.step_in_epoch} of {self.built.pipeline.steps_per_epoch})")
        if self.out is None:
            raise Preempted(f"{where}; nothing was saved (no workdir)", self.stop.agreed(),
                            None)
        raise Preempted(f"{where}; checkpoint saved in {self.out / 'checkpoints'}. Run the "
                        f"same command with --workdir={self.out} to resume",
                        self.stop.agreed(), self.out)


def _finish(built: Built, config: Config, state: TrainState, progress: Progress,
            trainer: Trainer, reporter: Reporter, started: float,
            checkpointer: Checkpointer | None) -> Result:
    """The run's model evaluated on the test split once; the summary."""
    variables, step = _runs_model(built, config, state, progress, trainer, checkpointer)
    history = progress.history
    final = history[step_epoch(history, step)] if history else None
    tta = config.tta_flip or config.tta_shift  # per-epoch validation saw one view an image
    if (final is None or tta) and built.pipeline.has_validation:
        val, _ = evaluate(built, state, "validation", variables)
        final = {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
    test, logits = evaluate(built, state, "test", variables)
    summary = _summary(built, config, state, progress, test, final or {}, step, reporter,
                       started)
    reporter.finish(summary, built.pipeline.split("test"), logits, history,
                    built.spec.class_names)
    return Result(state, built.graphdef, variables, history, summary, built.steps, config,
                  built.spec)


def _runs_model(built: Built, config: Config, state: TrainState, progress: Progress,
                trainer: Trainer, checkpointer: Checkpointer | None) -> tuple[dict, int]:
    """The weights the run reports, and their step: under early stopping the best epoch's
    (its checkpoint, kept by Orbax's best-checkpoint policy, or without a workdir the copy
    the trainer kept), else the last."""
    variables = inference_variables(state)
    if not config.patience or not progress.best_epoch:
        return variables, int(state.step)
    step = progress.history[progress.best_epoch - 1]["step"]
    if checkpointer is None:
        return trainer.best_variables, step
    if step == int(state.step):
        return variables, step
    template = {"params": variables["params"], "model_state": variables["model_state"]}
    return {**checkpointer.restore_variables(step, template), "rngs": variables["rngs"]}, step


def step_epoch(history: list[dict], step: int) -> int:
    """The index in ``history`` of the epoch that ended at ``step`` (the last if none)."""
    return next((i for i, r in enumerate(history) if r["step"] == step), len(history) - 1)


def _summary(built: Built, config: Config, state: TrainState, progress: Progress,
             test: dict, final: dict, step: int, reporter: Reporter, started: float) -> dict:
    history, throughput = progress.history, reporter.throughput
    return {
        "model": built.model_name, "optimizer": built.custom.get("optimizer", config.optimizer),
        "loss": built.custom.get("loss", config.loss), "num_params": built.num_params,
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "test_count": test["count"], "val_accuracy": final.get("val_accuracy"),
        "val_loss": final.get("val_loss"),
        "train_accuracy": history[-1]["train_accuracy"] if history else None,
        "epochs": len(history), "best_epoch": progress.best_epoch or len(history),
        "stopped_early": progress.stopped_early, "stopped_by": progress.stopped_by,
        "steps": history[-1]["step"] if history else int(state.step),
        # The weights the test and validation figures were measured with: those of this
        # step (the best epoch's under early stopping, else the last), their moving
        # average when --ema_decay > 0. fmnist-evaluate and load_model use them.
        "checkpoint_step": step, "weights": "ema" if state.ema is not None else "raw",
        "tta_flip": config.tta_flip, "tta_shift": config.tta_shift,
        "wall_time_s": progress.wall_time_s + time.perf_counter() - started,
        "train_time_s": sum(r["epoch_time_s"] for r in history),
        # Steady state: the first epoch of a process includes compilation.
        "train_images_per_s": (statistics.median(throughput[1:] or throughput)
                               if throughput else None),
        **reporter.timings,
        "test_done_s": process_age(),  # after the test evaluation, before the plots
        "peak_rss_mb": peak_rss_mb(),
        "jax_backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "num_devices": jax.device_count(), "num_processes": jax.process_count(),
        "dtype": config.dtype, "jax_version": jax.__version__,
        "data_source": config.data_source,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss: kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


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
        parallel.join(config.distributed)  # before anything computes
        tune_command_line(config.compilation_cache)  # the command owns its process
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
        where = ("a second time during training" if getattr(e, "during_training", False)
                 else "outside the training loop")
        print(f"fmnist-train: interrupted by {signal.Signals(signum).name} {where}"
              f"{_saved_hint(workdir)}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # ``fmnist-train ... | head``: stop as a Unix tool would
        print(f"fmnist-train: stopped, its output pipe was closed{_saved_hint(workdir)}",
              file=sys.stderr)
        return output_pipe_closed()
    return 0


def _saved_hint(workdir: str | None) -> str:
    saved = workdir is not None and (Path(workdir) / "checkpoints").is_dir() and any(
        p.name.isdigit() for p in (Path(workdir) / "checkpoints").iterdir())
    return (f"; the checkpoints in {workdir} are complete: run the same command with "
            f"--workdir={workdir} to go on" if saved else "; no training had been saved")


def _with_workdir(argv: list[str], e: Preempted) -> list[str]:
    """The command line to resume: the same flags, with the workdir made explicit."""
    args = [a for a in argv if not a.startswith("--fresh")]
    if e.workdir is None or any(a.startswith("--workdir") for a in args):
        return args
    return [*args, f"--workdir={e.workdir}"]


def command() -> None:
    """``fmnist-train`` and ``python -m fmnist_jax.train``."""
    sys.exit(main())


if __name__ == "__main__":
    command()
