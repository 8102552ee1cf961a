"""The training run: ``fit(config)``, ``train_and_evaluate(config, workdir)``, and the CLI.

    python -m fmnist_jax.train --model=cnn          # or: fmnist-train --model=cnn

Each epoch trains on the training split and evaluates on the validation split; at the end
the test split is evaluated once (with the best weights when early stopping is on). With a
workdir, the run writes ``config.json``, ``metrics.jsonl`` (one line per epoch) and
``summary.json`` there.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fmnist_jax import metrics as metrics_lib
from fmnist_jax.cli import parse_config
from fmnist_jax.config import Config
from fmnist_jax.data import Dataset, find_files, load_dataset
from fmnist_jax.errors import UserError
from fmnist_jax.input_pipeline import DeviceResident, TfdsStream
from fmnist_jax.models import count_params, create_model
from fmnist_jax.optim import make_optimizer, make_schedule
from fmnist_jax.steps import LossFn, Steps, TrainState, create_train_state, make_loss, make_steps


@dataclasses.dataclass
class Result:
    """What :func:`fit` returns."""

    state: TrainState  # final (or best, with early stopping) training state
    graphdef: nnx.GraphDef
    history: list[dict]  # one record per epoch, as in metrics.jsonl
    summary: dict  # as in summary.json
    steps: Steps  # the jitted step functions, for further evaluation

    @property
    def model(self) -> nnx.Module:
        """The trained model as an NNX module."""
        return nnx.merge(self.graphdef, self.state.params, self.state.model_state)


def _make_pipeline(config: Config, data: Dataset | None, data_key: jax.Array):
    if config.data_source == "tfds" and data is None:
        return TfdsStream(batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                          validation_size=config.validation_size, seed=config.seed,
                          data_dir=config.data_dir or None, manual_dir=_local_idx_dir())
    if data is None:
        data = load_dataset(config.data_dir or None, config.validation_size)
    return DeviceResident(data.train, {"validation": data.validation, "test": data.test},
                          batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                          steps_per_dispatch=config.steps_per_dispatch, rng=data_key)


def _local_idx_dir() -> str | None:
    """The local official files, if any: tfds prepares from them instead of downloading."""
    try:
        return str(find_files(None, download=False)["train_images"].parent)
    except UserError:
        return None


def _learning_rate(schedule: Callable | None, state: TrainState) -> float | None:
    if schedule is not None:
        return float(schedule(state.step))
    found = optax.tree_utils.tree_get(state.opt_state, "learning_rate")  # inject_hyperparams
    return None if found is None else float(found)


class _Monitor:
    """Early stopping: remembers the best epoch and a copy of its state."""

    def __init__(self, config: Config):
        self.key = config.monitor
        self.sign = -1.0 if config.monitor == "val_loss" else 1.0
        self.patience = config.patience
        self.best_value = -float("inf")
        self.best_epoch = 0
        self.best_state: TrainState | None = None

    def update(self, epoch: int, record: dict, state: TrainState) -> bool:
        """Returns True when training should stop."""
        value = self.sign * record[self.key]
        if value > self.best_value:
            self.best_value, self.best_epoch = value, epoch
            self.best_state = jax.tree.map(jnp.copy, state)  # ``state`` gets donated
        return epoch - self.best_epoch >= self.patience


def fit(config: Config = Config(), *, model: nnx.Module | None = None,
        optimizer: optax.GradientTransformation | None = None, loss_fn: LossFn | None = None,
        data: Dataset | None = None, workdir: str | None = None) -> Result:
    """Trains and evaluates; returns the trained state, the history and a summary.

    ``model``, ``optimizer`` and ``loss_fn`` replace the named ones of ``config``: any NNX
    module called as ``model(x, train=..., rngs=...)``, any optax transformation, and any
    ``loss_fn(logits, labels) -> per-example loss``. ``data`` replaces loading Fashion-MNIST.
    ``workdir`` (default ``config.workdir``; empty writes nothing) receives the run's files.
    """
    config.validate()
    started = time.perf_counter()
    workdir = workdir if workdir is not None else config.workdir
    out = metrics_lib.prepare_workdir(workdir) if workdir else None
    init_key, dropout_key, data_key = jax.random.split(jax.random.key(config.seed), 3)

    pipeline = _make_pipeline(config, data, data_key)
    steps_per_epoch = pipeline.steps_per_epoch
    model_name = config.model if model is None else type(model).__name__
    if model is None:
        model = create_model(config.model, rngs=nnx.Rngs(params=init_key),
                             **config.model_kwargs())
    schedule = None
    if optimizer is None:
        schedule = make_schedule(config.schedule, config.learning_rate,
                                 config.epochs * steps_per_epoch, steps_per_epoch,
                                 warmup_epochs=config.warmup_epochs,
                                 decay_rate=config.decay_rate)
        optimizer = make_optimizer(config.optimizer, schedule, momentum=config.momentum,
                                   nesterov=config.nesterov, weight_decay=config.weight_decay,
                                   clip_grad_norm=config.clip_grad_norm)
    loss_fn = loss_fn or make_loss(config.loss, config.label_smoothing)
    num_params = count_params(model)
    graphdef, state = create_train_state(model, optimizer, dropout_key)
    steps = make_steps(graphdef, optimizer, loss_fn)
    has_validation = pipeline.has_validation

    if out:
        metrics_lib.write_json(out / "config.json", dataclasses.asdict(config))
        writer = metrics_lib.JsonlWriter(out / "metrics.jsonl")
    print(f"fmnist_jax: {model_name} ({num_params:,} parameters), {config.optimizer} "
          f"lr {config.learning_rate:g} {config.schedule}, {config.epochs} epochs of "
          f"{steps_per_epoch} steps x {config.batch_size}, on {jax.default_backend()}"
          + (f"; writing to {out}" if out else ""), flush=True)

    monitor = _Monitor(config) if config.patience else None
    history: list[dict] = []
    throughput: list[float] = []
    try:
        for epoch in range(1, config.epochs + 1):
            record = _train_one_epoch(pipeline, steps, state, epoch, config, steps_per_epoch)
            state = record.pop("_state")
            throughput.append(record["images_per_s"])
            record["learning_rate"] = _learning_rate(schedule, state)
            if has_validation:
                val = pipeline.evaluate(state, "validation", steps)
                record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            record["wall_time_s"] = time.perf_counter() - started
            history.append(record)
            if out:
                writer.write(record)
            _print_epoch(record, config.epochs)
            if monitor and monitor.update(epoch, record, state):
                print(f"early stopping: no {config.monitor} improvement for "
                      f"{config.patience} epochs; restoring epoch {monitor.best_epoch}")
                break
    finally:
        if out:
            writer.close()

    if monitor and monitor.best_state is not None:
        state = monitor.best_state
    test = pipeline.evaluate(state, "test", steps)
    final_val = pipeline.evaluate(state, "validation", steps) if has_validation else None
    summary = {
        "model": model_name,
        "num_params": num_params,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_count": test["count"],
        "val_accuracy": final_val["accuracy"] if final_val else None,
        "val_loss": final_val["loss"] if final_val else None,
        "train_accuracy": history[-1]["train_accuracy"] if history else None,
        "epochs": len(history),
        "best_epoch": monitor.best_epoch if monitor else len(history),
        "steps": int(state.step),
        "wall_time_s": time.perf_counter() - started,
        "train_time_s": sum(r["epoch_time_s"] for r in history),
        # Steady state: the first epoch includes compilation.
        "train_images_per_s": (statistics.median(throughput[1:] or throughput)
                               if throughput else None),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax_version": jax.__version__,
        "data_source": config.data_source,
    }
    if out:
        metrics_lib.write_json(out / "summary.json", summary)
    print(f"test: loss {test['loss']:.4f}, accuracy {100 * test['accuracy']:.2f}% "
          f"({test['count']} images); {summary['wall_time_s']:.1f} s in all", flush=True)
    return Result(state, graphdef, history, summary, steps)


def _train_one_epoch(pipeline, steps: Steps, state: TrainState, epoch: int, config: Config,
                     steps_per_epoch: int) -> dict:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    done, loss_sum, acc_sum = 0, 0.0, 0.0
    with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", unit="step",
              disable=not config.progress, leave=False, file=sys.stderr) as bar:
        for state, sums, n in pipeline.train_epoch(state, epoch, steps):
            loss_sum += float(sums["loss"])  # one host sync per dispatch
            acc_sum += float(sums["accuracy"])
            done += n
            bar.update(n)
            rate = done * config.batch_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss_sum / done:.4f}", acc=f"{acc_sum / done:.4f}",
                            img_s=f"{rate:,.0f}")
    seconds = time.perf_counter() - start
    return {"epoch": epoch, "step": int(state.step), "train_loss": loss_sum / max(done, 1),
            "train_accuracy": acc_sum / max(done, 1), "epoch_time_s": seconds,
            "images_per_s": done * config.batch_size / seconds, "_state": state}


def _print_epoch(r: dict, epochs: int) -> None:
    val = (f"  val loss {r['val_loss']:.4f} acc {100 * r['val_accuracy']:.2f}%"
           if "val_loss" in r else "")
    lr = f"  lr {r['learning_rate']:.2e}" if r.get("learning_rate") is not None else ""
    print(f"epoch {r['epoch']:>3}/{epochs}  train loss {r['train_loss']:.4f} "
          f"acc {100 * r['train_accuracy']:.2f}%{val}{lr}  "
          f"{r['images_per_s']:,.0f} img/s  {r['epoch_time_s']:.1f} s", flush=True)


def train_and_evaluate(config: Config, workdir: str) -> Result:
    """Trains with ``config``, writing the run's files into ``workdir``."""
    return fit(config, workdir=workdir)


def default_workdir(config: Config) -> str:
    return f"runs/{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
        train_and_evaluate(config, config.workdir or default_workdir(config))
    except UserError as e:
        print(f"fmnist-train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fmnist-train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
