"""Building a run from its config: the data pipeline, the model and its training state, the
optimizer and loss, the jitted steps, and the words that describe them.

``fit`` calls :func:`build` once; everything it returns is fixed for the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import optax
from flax import nnx

from fmnist_jax import adapt
from fmnist_jax.augment import Augment, Mix
from fmnist_jax.config import Config
from fmnist_jax.data import DataSpec, Dataset, load_dataset
from fmnist_jax.errors import UserError
from fmnist_jax.input_pipeline import DeviceResident, Pipeline, load_tfds
from fmnist_jax.models import create_model, whiten_first_convolution, whitening_filters
from fmnist_jax.optim import make_optimizer, make_schedule
from fmnist_jax.parallel import Devices
from fmnist_jax.steps import (LossFn, Steps, TrainState, create_train_state, make_loss,
                              make_steps, normalize, split_model)


@dataclasses.dataclass
class Built:
    """The fixed parts of a run."""

    pipeline: Pipeline  # DeviceResident or Streamed
    spec: DataSpec  # the data's image shape, classes and pixel statistics
    graphdef: nnx.GraphDef
    state: TrainState  # the initial state, on every device
    steps: Steps
    schedule: Callable | None  # the learning rate by step, when the config's optimizer
    custom: dict  # what the caller passed in place of the config's: model/optimizer/loss
    model_name: str
    num_params: int

    def describe(self, config: Config, devices: Devices) -> str:
        """The start-up line."""
        optimizer = ("custom optimizer" if "optimizer" in self.custom else
                     f"{config.optimizer} lr {config.learning_rate:g} {config.schedule}")
        loss = ", custom loss" if "loss" in self.custom else ""
        n = config.accumulate_steps
        batches = (f"{self.pipeline.steps_per_epoch} steps x {config.batch_size}" if n == 1
                   else f"{self.pipeline.steps_per_epoch} micro-batches x "
                        f"{config.batch_size}, an update every {n} "
                        f"({n * config.batch_size} images)")
        spec = self.spec
        data = "" if spec.name == "fashion_mnist" else (
            f" on {spec.name} ({'x'.join(map(str, spec.image_shape))}, "
            f"{spec.num_classes} classes)")
        return (f"fmnist_jax: {self.model_name} ({self.num_params:,} parameters){data}, "
                f"{optimizer}{loss}, {config.epochs} epochs of {batches}, on "
                f"{devices.count} {jax.default_backend()} device(s)")


def build(config: Config, devices: Devices, *, model=None, optimizer=None,
          loss_fn: LossFn | None = None, data: Dataset | None = None) -> Built:
    """The pipeline, state and steps of a run; ``model``, ``optimizer``, ``loss_fn`` and
    ``data`` replace the config's when given (see :func:`fmnist_jax.fit`)."""
    if model is not None and config.dtype != "float32":
        raise UserError(f"dtype={config.dtype} sets the computation dtype of this library's "
                        "models; build your model's layers with Flax's dtype=jnp.bfloat16 "
                        "instead (parameters stay float32) and leave dtype at float32")
    keys = dict(zip(("params", "dropout", "augment", "data"),
                    jax.random.split(jax.random.key(config.seed), 4)))
    pipeline, spec = make_pipeline(config, data, keys["data"], devices)
    if config.patience and not pipeline.has_validation:
        raise UserError("--patience needs a validation split, and the data given to fit has "
                        "none (Dataset.validation is None)")
    custom = {name: value for name, given, value in (
        ("model", model, model is not None and adapt.describe(model)),
        ("optimizer", optimizer, "custom"), ("loss", loss_fn, "custom")) if given is not None}
    schedule = None
    if optimizer is None:
        optimizer, schedule = configured_optimizer(config, pipeline.steps_per_epoch)
    if config.accumulate_steps > 1:
        optimizer = optax.MultiSteps(optimizer, config.accumulate_steps
                                     ).gradient_transformation()
    statistics = (spec.mean, spec.std)
    sample = normalize(pipeline.split("test").images[:2], statistics)
    if model is None:
        filters = (whitening_filters(normalize(pipeline.train_sample(WHITENING_SAMPLE),
                                               statistics)) if config.whiten else None)
        graphdef, state = _named_state(config, spec, optimizer, keys, devices, filters)
    elif config.whiten:
        raise UserError("--whiten starts this library's CNN or ResNet; for a model of your "
                        "own, set its first convolution's kernel from "
                        "fmnist_jax.models.whitening_filters(images) before fit")
    else:
        graphdef, state = _user_state(model, config, optimizer, keys, sample, devices)
    adapt.check(graphdef, (state.params, state.rngs, state.model_state), sample,
                spec.num_classes)
    steps = make_steps(graphdef, optimizer, loss_fn or make_loss(config.loss,
                                                                 config.label_smoothing),
                       replicated=devices.replicated,
                       ema_decay=config.ema_decay,
                       augment=Augment(config.random_crop, config.random_flip,
                                       config.random_erasing) or None,
                       mix=Mix(config.mixup, config.cutmix, config.mix_prob) or None,
                       tta_flip=config.tta_flip, tta_shift=config.tta_shift,
                       accumulate_steps=config.accumulate_steps, statistics=statistics)
    return Built(pipeline, spec, graphdef, state, steps, schedule, custom,
                 custom.get("model", config.model),
                 sum(x.size for x in jax.tree.leaves(state.params)))


# Training images whose 3x3 patches give --whiten's filters (7.8 million patches of 28x28)
WHITENING_SAMPLE = 10_000


def make_pipeline(config: Config, data: Dataset | None, key: jax.Array, devices: Devices
                  ) -> tuple[Pipeline, DataSpec]:
    """The run's data and its spec: ``data`` or the IDX files of ``--dataset`` on the
    device, or a tfds data set through Grain."""
    seed = [int(w) for w in np.asarray(jax.random.key_data(key)).ravel()]
    if config.data_source == "tfds" and data is None:
        return load_tfds(config, devices, seed[-1])
    if data is None:
        data = load_dataset(config.data_dir or None, config.validation_size,
                            dataset=config.dataset)
    return DeviceResident(data.train, {"validation": data.validation, "test": data.test},
                          devices=devices, batch_size=config.batch_size,
                          eval_batch_size=config.eval_batch_size,
                          steps_per_dispatch=config.steps_per_dispatch, seed=seed), data.spec()


def configured_optimizer(config: Config, steps_per_epoch: int
                         ) -> tuple[optax.GradientTransformation, Callable]:
    """The config's optimizer, and its learning rate by training step. The schedule counts
    updates: with ``accumulate_steps`` = N, one every N steps."""
    n = config.accumulate_steps
    per_update = make_schedule(config.schedule, config.learning_rate,
                               config.epochs * steps_per_epoch // n,
                               max(steps_per_epoch // n, 1),
                               warmup_epochs=config.warmup_epochs,
                               decay_rate=config.decay_rate)
    optimizer = make_optimizer(config.optimizer, per_update, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay,
                               clip_grad_norm=config.clip_grad_norm)
    return optimizer, per_update if n == 1 else (lambda step: per_update(step // n))


def _named_state(config: Config, spec: DataSpec, optimizer, keys: dict, devices: Devices,
                 filters: np.ndarray | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """The named model and its optimizer state, built by one compiled program (one
    compilation-cache lookup at start-up instead of dozens for eager ops) straight onto
    every device. The values are bitwise those of building them eagerly. ``filters``:
    the first convolution's whitening start (``--whiten``)."""

    def model(keys):
        built = create_model(config.model, rngs=nnx.Rngs(params=keys["params"],
                                                         dropout=keys["dropout"]),
                             **config.model_kwargs(), image_shape=spec.image_shape,
                             num_classes=spec.num_classes)
        if filters is not None:
            whiten_first_convolution(built, filters)
        return built

    def init(keys) -> TrainState:
        return create_train_state(model(keys), optimizer, keys["augment"],
                                  ema=config.ema_decay > 0)[1]

    graphdef = split_model(nnx.eval_shape(model, keys))[0]
    return graphdef, jax.jit(init, out_shardings=devices.replicated)(keys)


def _user_state(model, config: Config, optimizer, keys: dict, sample: np.ndarray,
                devices: Devices) -> tuple[nnx.GraphDef, TrainState]:
    """A model of the caller's (NNX or Linen) and its optimizer state, on every device."""
    work = adapt.prepare(model, sample,
                         nnx.Rngs(params=keys["params"], dropout=keys["dropout"]))
    graphdef, state = create_train_state(work, optimizer, keys["augment"],
                                         ema=config.ema_decay > 0)
    return graphdef, devices.replicate(state)
