"""A trained model, ready to classify raw images: :class:`Classifier` and :func:`load_model`.

**The run's model** is the one rule every tool follows: the weights the run's
``summary.json`` measured its test accuracy with. That is the state at the end of training,
or the best epoch's by ``--monitor`` when early stopping (``--patience``) is on, and in either
case its moving average of the weights when ``--ema_decay`` > 0. ``fit`` returns it
(``Result.classifier``), and ``load_model(workdir)``, ``fmnist-evaluate`` and
``fmnist-predict`` load it from the checkpoint of that step (``summary.json``'s
``checkpoint_step``). Another checkpoint is used only when asked for by step or as the best
by validation; a run that has not finished yet offers its latest checkpoint.

A :class:`Classifier` takes images as the run's data had them (its
:class:`~fmnist_jax.data.DataSpec`, kept in the workdir's ``config.json``): for
Fashion-MNIST uint8 images (or floats from 0 to 255), ``(N, 28, 28)`` or ``(N, 28, 28, 1)``;
it normalises them itself, with the training split's statistics. It runs the very program of the run's own
evaluations (:func:`fmnist_jax.steps.eval_batches`, batches of the run's
``--eval_batch_size``), so its logits, and the loss and accuracy computed from them, are
those of ``summary.json`` to the last digit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from fmnist_jax import adapt
from fmnist_jax.checkpoints import Checkpoints, quiet_orbax
from fmnist_jax.config import Config
from fmnist_jax.data import DataSpec
from fmnist_jax.errors import UserError
from fmnist_jax.input_pipeline import batched, unbatched
from fmnist_jax.metrics import classification
from fmnist_jax.models import create_model
from fmnist_jax.steps import make_eval_steps, split_model


@dataclasses.dataclass
class Classifier:
    """A model's graph and inference weights, with the jitted program that runs them."""

    graphdef: nnx.GraphDef
    variables: dict  # {"params", "model_state", "rngs"}: the weights the run reports
    batch_size: int = 100  # images per evaluation step: the run's --eval_batch_size
    step: int | None = None  # the checkpoint's step, when loaded from one
    description: str = ""  # which weights these are, in words
    tta_flip: bool = False  # the run's --tta_flip: logits averaged with the mirror image's
    tta_shift: int = 0  # the run's --tta_shift: and over translations of up to N pixels
    spec: DataSpec = DataSpec()  # the images it takes, their classes and statistics

    @functools.cached_property
    def _eval_batches(self):
        return make_eval_steps(self.graphdef, self.tta_flip, self.tta_shift,
                               (self.spec.mean, self.spec.std)).eval_batches

    @property
    def model(self) -> nnx.Module:
        """The trained ``nnx.Module``, in eval mode (a copy of the weights)."""
        model = nnx.merge(self.graphdef, self.variables["params"], self.variables["rngs"],
                          self.variables["model_state"], copy=True)
        model.eval()
        return model

    def logits(self, images) -> np.ndarray:
        """float32 logits ``(N, K)`` for images ``(N, H, W, C)`` (or ``(N, H, W)`` for one
        channel) of the run's shape: uint8 or 0-255 floats, or for a run on float images,
        floats in their units."""
        images = as_pixels(images, self.spec)
        if len(images) == 0:
            return np.zeros((0, self.spec.num_classes), np.float32)
        return unbatched(self._eval_batches(self.variables, batched(images, self.batch_size)),
                         len(images))

    def predict(self, images) -> np.ndarray:
        """Class probabilities ``(N, K)`` (see :meth:`logits` for the input)."""
        return np.asarray(jax.nn.softmax(self.logits(images), axis=-1))

    def evaluate(self, images, labels) -> dict:
        """Loss, accuracy and count, as the run computes them."""
        return classification(self.logits(images), labels)


def as_pixels(images, spec: DataSpec = DataSpec()) -> np.ndarray:
    """Images as ``(N, H, W, C)`` pixels of ``spec``: from 0 to 255 (uint8 kept as it is),
    or float32 for a run on float images."""
    images = np.asarray(images)
    shape = spec.image_shape
    if images.ndim == 3 and shape[-1] == 1:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != shape:
        one = f"(N, {shape[0]}, {shape[1]}) or " if shape[-1] == 1 else ""
        raise UserError(f"images must be {one}(N, {', '.join(map(str, shape))}), got "
                        f"{images.shape}")
    if images.dtype == np.uint8 and spec.pixels == "uint8":
        return images
    if not np.issubdtype(images.dtype, np.number) or np.issubdtype(images.dtype,
                                                                   np.complexfloating):
        raise UserError(f"images must be uint8 or 0-255 numbers, got dtype {images.dtype}")
    images = images.astype(np.float32)
    if spec.pixels != "uint8":  # the run's own units
        return images
    if images.size and (images.min() < 0 or images.max() > 255):
        raise UserError(f"pixel values must lie in 0-255, got {images.min():g} to "
                        f"{images.max():g}")
    if images.size and 0 < images.max() <= 1:
        raise UserError("pixel values lie in 0-1: pass 0-255 values (e.g. images * 255) or "
                        "uint8 images; the model normalises them itself")
    return images


def load_model(workdir: str | os.PathLike, *, step: int | None = None, best: bool = False,
               model: nnx.Module | None = None) -> Classifier:
    """The run's model from ``workdir`` (see the module docstring), or the checkpoint of
    ``step``, or with ``best`` the best by the run's ``--monitor``.

    Models named by the run's config are rebuilt from it; a run that trained a module of
    your own needs it passed as ``model`` (untrained is fine: only its structure is used).
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"--workdir={workdir} does not exist")
    config, custom, summary, spec = read_run(workdir)
    if model is None and "model" in custom:
        raise UserError(f"{workdir} was trained with a model of your own ({custom['model']}); "
                        "pass it: load_model(workdir, model=...)")
    if model is None:
        model = create_model(config.model, rngs=nnx.Rngs(0), **config.model_kwargs(),
                             image_shape=spec.image_shape, num_classes=spec.num_classes)
    else:
        model = adapt.prepare(model, np.zeros((2, *spec.image_shape), np.float32),
                              nnx.Rngs(0))
    graphdef, params, rngs, model_state = split_model(model)
    with quiet_orbax():
        chosen, description, variables = _restore(
            workdir, config, summary, step, best, {"params": params, "model_state": model_state})
    return Classifier(graphdef, {**variables, "rngs": rngs}, config.eval_batch_size,
                      chosen, description, config.tta_flip, config.tta_shift, spec)


def _restore(workdir: Path, config: Config, summary: dict | None, step: int | None,
             best: bool, template: dict) -> tuple[int, str, dict]:
    """The chosen checkpoint's step, its description, and its inference variables."""
    ckpt = Checkpoints(workdir, monitor=config.monitor, read_only=True)
    try:
        chosen, description = _choose_step(ckpt, summary, step, best, config.monitor)
        part = "ema" if config.ema_decay > 0 else None
        restored, _ = ckpt.restore(chosen, {part: template} if part else template,
                                   partial=True)
    finally:
        ckpt.manager.close()
    return chosen, description, restored[part] if part else restored


def read_run(workdir: Path) -> tuple[Config, dict, dict | None, DataSpec]:
    """The run's config, what it trained in place of the config's (``custom``), its
    summary if it has finished, and its data's spec."""
    path = workdir / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} holds no config.json: not the workdir of a training run")
    values = json.loads(path.read_text())
    summary_path = workdir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return (Config.from_dict(values), values.get("custom", {}), summary,
            DataSpec.from_dict(values.get("data")))


def _choose_step(ckpt: Checkpoints, summary: dict | None, step: int | None, best: bool,
                 monitor: str) -> tuple[int, str]:
    steps = ckpt.steps()
    if not steps:
        raise UserError(f"{ckpt.directory} holds no checkpoint yet")
    if step is not None and best:
        raise UserError("give --step or --best, not both")
    if step is not None:
        if step not in steps:
            raise UserError(f"--step={step} is not in {ckpt.directory}; it holds steps "
                            f"{', '.join(map(str, steps))}")
        return step, f"the checkpoint of step {step} (asked for)"
    if best:
        found = ckpt.best_step()
        if found is None:
            raise UserError(f"{ckpt.directory} has no checkpoint with validation metrics "
                            "(was --validation_size=0?); use --step")
        return found, f"the best checkpoint by {monitor} (step {found}; asked for)"
    if summary is not None and summary.get("checkpoint_step") in steps:
        found = summary["checkpoint_step"]
        return found, f"the run's model (step {found}, as in summary.json)"
    if summary is not None:
        raise UserError(f"the checkpoint of the run's model (step "
                        f"{summary.get('checkpoint_step')}) is no longer in "
                        f"{ckpt.directory}; choose one with --step or --best")
    return steps[-1], (f"the latest checkpoint (step {steps[-1]}): the run has not "
                       "finished, so it has no summary.json yet")
