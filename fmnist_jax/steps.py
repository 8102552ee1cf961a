"""Pure training and evaluation steps over an NNX model used functionally.

The model is split once into a static ``graphdef`` and array state; a step merges them,
runs, and splits again, so every step is a pure function of explicit arrays::

    state, metrics = train_step(state, batch)      # jitted, ``state`` donated
    logits = eval_step(variables, images)          # jitted

A training batch is ``{"image": uint8 (B, 28, 28, 1), "label": int32 (B,)}``. Images are
normalised inside the steps, so batches stay uint8 (4x less memory and host-to-device
traffic than float32). Evaluation returns logits; loss and accuracy are computed from them
on the host (:mod:`fmnist_jax.metrics`), the same way for every caller.
The model is any ``nnx.Module`` called as ``model(x)`` whose modes are set the Flax way
(``model.train()`` / ``model.eval()``); dropout keys come from its own ``nnx.Rngs`` streams,
kept in the state: the same seed gives the same run, and a resumed run the same bits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fmnist_jax.kernels import cpu_compiler_options

from fmnist_jax.data import PIXEL_MEAN, PIXEL_STD

# Per-channel pixel mean and standard deviation (of pixels / 255): Fashion-MNIST's by
# default, else those of the run's data (fmnist_jax.data.DataSpec).
Statistics = tuple[tuple[float, ...], tuple[float, ...]]
FASHION_MNIST_STATISTICS: Statistics = ((PIXEL_MEAN,), (PIXEL_STD,))

LOSSES = ("sparse", "categorical")
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree of arrays."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # the model's nnx.Param variables
    model_state: nnx.State  # its other variables but the RNG streams (batch statistics, ...)
    rngs: nnx.State  # the model's nnx.Rngs streams (dropout keys and counts)
    opt_state: optax.OptState
    rng: jax.Array  # base key for augmentation; step key = fold_in(rng, step)
    # Exponential moving averages of ``params`` and ``model_state`` (``{"params": ...,
    # "model_state": ...}``), or None. When present, evaluation and prediction use them.
    ema: dict | None = None


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """``(graphdef, params, rngs, model_state)``: the parameters, the RNG streams, and every
    other variable."""
    return nnx.split(model, nnx.Param, nnx.RngState, ...)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation,
                       rng: jax.Array, *, ema: bool = False) -> tuple[nnx.GraphDef, TrainState]:
    """Splits ``model`` into its graph definition and a fresh :class:`TrainState` (with
    moving averages of the weights when ``ema``). The state holds copies of the module's
    arrays: training donates its buffers, and ``model`` stays usable."""
    graphdef, params, rngs, model_state = split_model(model)
    params, rngs, model_state = jax.tree.map(jnp.copy, (params, rngs, model_state))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                       rngs=rngs, opt_state=tx.init(params), rng=rng,
                       ema=jax.tree.map(jnp.copy, {"params": params, "model_state": model_state})
                       if ema else None)  # copies: donating the state donates each buffer once
    return graphdef, state


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """The averaging weight of the old average at ``step`` (0-based): ``decay``, but at most
    ``(1 + step) / (10 + step)``, so that the first steps' random weights fade fast."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _update_ema(ema: dict, new: dict, decay: jax.Array) -> dict:
    """``optax.incremental_update`` of the floating-point variables (other leaves follow the
    model)."""
    return jax.tree.map(lambda avg, x: optax.incremental_update(x, avg, 1.0 - decay)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, ema, new)


def inference_variables(state: TrainState) -> dict:
    """The variables to evaluate and predict with, ``{"params", "model_state", "rngs"}``:
    the moving averages of the weights when the state keeps them."""
    weights = state.ema if state.ema is not None else {
        "params": state.params, "model_state": state.model_state}
    return {**weights, "rngs": state.rngs}


def normalize(images: jax.Array, statistics: Statistics = FASHION_MNIST_STATISTICS
              ) -> jax.Array:
    """Pixels ``(..., C)`` (uint8, or floats in the units of ``statistics``) to standardised
    float32, channel by channel."""
    # One channel: Python scalars, so that the program (and its rounding) is the one of
    # earlier versions, whose runs are reproduced bit for bit.
    mean, std = (v[0] if len(v) == 1 else jnp.asarray(v, jnp.float32) for v in statistics)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def cross_entropy(logits: jax.Array, labels: jax.Array, *, loss: str = "sparse",
                  label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy from integer labels.

    ``sparse`` uses the integer labels directly; ``categorical`` turns them into one-hot
    targets first (as the Keras seed CNN did). Without smoothing both give the same value;
    with ``label_smoothing`` the targets become ``(1 - a) * one_hot + a / 10``.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if loss == "sparse" and label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def mixed_loss(loss_fn: LossFn, logits: jax.Array, labels: jax.Array, partner: jax.Array,
               lam: jax.Array) -> jax.Array:
    """Per-example loss of mixed images (:class:`fmnist_jax.augment.Mix`): ``lam`` of the
    loss of each image's own label and ``1 - lam`` of its partner's. ``loss_fn`` must give
    one loss per example."""
    own, other = loss_fn(logits, labels), loss_fn(logits, labels[partner])
    if own.shape != labels.shape:
        raise ValueError(f"--mixup and --cutmix need a loss_fn that gives one loss per "
                         f"example, shape {labels.shape}; it gave shape {own.shape}")
    return lam * own + (1 - lam) * other


def make_loss(loss: str = "sparse", label_smoothing: float = 0.0) -> LossFn:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return functools.partial(cross_entropy, loss=loss, label_smoothing=label_smoothing)


def _merge(graphdef, variables: dict) -> nnx.Module:
    """The model of ``{"params", "rngs", "model_state"}``."""
    return nnx.merge(graphdef, variables["params"], variables["rngs"],
                     variables["model_state"], copy=True)


def train_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, loss_fn: LossFn, ema_decay: float = 0.0,
               augment: Callable | None = None, mix: Callable | None = None,
               accumulate_steps: int = 1, statistics: Statistics = FASHION_MNIST_STATISTICS
               ) -> tuple[TrainState, dict]:
    """One training step. Returns the new state and the batch's mean loss and accuracy.
    ``state.step`` counts these steps; with ``accumulate_steps`` = N (``tx`` an
    ``optax.MultiSteps``) the weights change every N-th step, and so do their moving
    averages.

    The model runs in training mode (``model.train()``), as ``model(images)``; dropout
    draws from the model's own RNG streams, which advance in the state. The model computes
    in its own dtype (Flax's ``dtype``, e.g. bfloat16); the images it gets and the loss are
    float32, as are the gradients of float32 parameters. When the state keeps
    moving averages, they move with weight :func:`ema_decay_at`. ``augment`` (an
    :class:`fmnist_jax.augment.Augment`) transforms the float pixels with the key
    ``fold_in(state.rng, state.step)``; then ``mix`` (a :class:`fmnist_jax.augment.Mix`)
    mixes pairs of them with ``fold_in`` of that key and 1, and the loss weighs both
    labels (:func:`mixed_loss`); the accuracy counts each image's label of larger weight.
    """
    images, labels = batch["image"].astype(jnp.float32), batch["label"]
    key = jax.random.fold_in(state.rng, state.step)
    if augment:
        images = augment(images, key)
    example_loss, counted = loss_fn, labels
    if mix:
        images, partner, lam = mix(images, jax.random.fold_in(key, 1))
        example_loss = functools.partial(mixed_loss, loss_fn, partner=partner, lam=lam)
        counted = jnp.where(lam >= 0.5, labels, labels[partner])
    images = normalize(images, statistics)

    def objective(params, rngs, model_state):
        model = _merge(graphdef, {"params": params, "rngs": rngs,
                                  "model_state": model_state})
        model.train()
        logits = model(images)
        _, _, new_rngs, new_model_state = split_model(model)
        new_model_state = jax.tree.map(lambda new, old: new.astype(old.dtype),
                                       new_model_state, model_state)
        loss = example_loss(logits.astype(jnp.float32), labels).mean()
        return loss, (logits, new_rngs, new_model_state)

    (loss, (logits, rngs, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, state.rngs, state.model_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = (logits.argmax(-1) == counted).mean()
    ema = state.ema
    if ema is not None:
        updates_done = state.step // accumulate_steps  # 0-based index of this update
        moved = _update_ema(ema, {"params": params, "model_state": model_state},
                            ema_decay_at(updates_done, ema_decay))
        if accumulate_steps > 1:  # an update happens at the last micro-batch of N
            updated = (state.step + 1) % accumulate_steps == 0
            moved = jax.tree.map(lambda new, old: jnp.where(updated, new, old), moved, ema)
        ema = moved
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              rngs=rngs, opt_state=opt_state, ema=ema)
    return new_state, {"loss": loss, "accuracy": accuracy}


def eval_step(variables: dict, images: jax.Array, *, graphdef: nnx.GraphDef,
              tta_flip: bool = False, tta_shift: int = 0,
              statistics: Statistics = FASHION_MNIST_STATISTICS) -> jax.Array:
    """float32 logits ``(B, 10)`` for a batch of uint8 (or 0-255 float) images, in inference
    mode (``model.eval()``), with ``variables`` = ``{"params", "model_state", "rngs"}``
    (:func:`inference_variables`).

    Every evaluation of the library goes through this function: validation and test
    during training, ``fmnist-evaluate``, ``fmnist-predict`` and ``Result.predict``; loss
    and accuracy are computed from its logits (:func:`fmnist_jax.metrics.classification`).
    With test-time augmentation the logits are the mean over :func:`tta_views`, computed
    one view after another (``lax.scan``), so memory holds one view's activations: a lower
    peak than all views at once, and no slower (figures in experiments/README.md).
    """
    model = _merge(graphdef, variables)
    model.eval()
    logits = lambda v: model(normalize(v, statistics)).astype(jnp.float32)  # noqa: E731
    views = tta_views(images, flip=tta_flip, shift=tta_shift)
    if len(views) == 1:
        return logits(images)
    out = jax.eval_shape(logits, images)  # the model's forward appears once, in the loop
    total, _ = jax.lax.scan(lambda total, v: (total + logits(v), None),
                            jnp.zeros(out.shape, out.dtype), jnp.stack(views))
    return total / len(views)


def tta_views(images: jax.Array, *, flip: bool = False, shift: int = 0) -> list:
    """The views of ``(B, H, W, C)`` raw images that test-time augmentation averages over:
    the images themselves; with ``shift`` = N the ``(2N+1)**2`` translations by -N to +N
    pixels along each axis (black enters at the edge), as random crops of N or more pixels
    train the model to expect (``True`` is 1: 9 views); with ``flip`` each view and its
    mirror image (clothing is mirror-symmetric)."""
    views = [images]
    if shift:
        n, (h, w) = int(shift), images.shape[1:3]
        padded = jnp.pad(images, ((0, 0), (n, n), (n, n), (0, 0)))
        views = [padded[:, n + dy:n + dy + h, n + dx:n + dx + w]
                 for dy in range(-n, n + 1) for dx in range(-n, n + 1)]
    if flip:
        views += [v[:, :, ::-1] for v in views]
    return views


def eval_batches(variables: dict, images: jax.Array, *, graphdef: nnx.GraphDef,
                 tta_flip: bool = False, tta_shift: int = 0,
                 statistics: Statistics = FASHION_MNIST_STATISTICS) -> jax.Array:
    """:func:`eval_step` over ``(batches, batch, 28, 28, 1)`` images, one batch at a time:
    logits ``(batches, batch, 10)``."""
    return jax.lax.map(lambda batch: eval_step(variables, batch, graphdef=graphdef,
                                               tta_flip=tta_flip, tta_shift=tta_shift,
                                               statistics=statistics),
                       images)


def scan_train_steps(state: TrainState, images: jax.Array, labels: jax.Array,
                     indices: jax.Array, *, step_fn) -> tuple[TrainState, dict]:
    """Runs ``step_fn`` over ``indices`` ``(steps, batch)`` into device-resident
    ``images`` and ``labels``, gathering each batch on the device, in one scan. Returns the
    state and each step's metrics, stacked ``(steps,)``."""

    def body(state, idx):
        return step_fn(state, {"image": images[idx], "label": labels[idx]})

    return jax.lax.scan(body, state, indices)


def scan_train_batches(state: TrainState, images: jax.Array, labels: jax.Array, *,
                       step_fn) -> tuple[TrainState, dict]:
    """Runs ``step_fn`` over batches ``(steps, batch, ...)`` in one scan; returns the state
    and each step's metrics, stacked ``(steps,)``."""

    def body(state, batch):
        return step_fn(state, {"image": batch[0], "label": batch[1]})

    return jax.lax.scan(body, state, (images, labels))


class Steps(NamedTuple):
    """The jitted functions of one run, built by :func:`make_steps`."""

    train_step: Callable  # (state, batch) -> (state, metrics); donates the state
    # (state, images, labels, indices) -> (state, per-step metrics); donates the state
    train_scan: Callable
    # (state, batched images, batched labels) -> (state, per-step metrics); donates
    train_batches: Callable
    # The run's evaluation, with its test-time augmentation (if any):
    eval_step: Callable  # (variables, images) -> logits
    eval_batches: Callable  # (variables, batched images) -> batched logits
    # eval_batches without test-time augmentation, one view per image: the per-epoch
    # validation (and --test_every_epoch) that follows training and early stopping
    monitor_batches: Callable


def make_steps(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_fn: LossFn,
               *, replicated=None, ema_decay: float = 0.0,
               augment: Callable | None = None, mix: Callable | None = None,
               tta_flip: bool = False, tta_shift: int = 0, accumulate_steps: int = 1,
               statistics: Statistics = FASHION_MNIST_STATISTICS) -> Steps:
    """Binds the static pieces and jits; training functions donate the state.
    ``tta_flip`` and ``tta_shift`` (see :func:`tta_views`) apply to ``eval_step`` and
    ``eval_batches``, not to ``monitor_batches``.

    ``replicated`` (a sharding) pins the state and the metrics to every device of the
    mesh, so that the outputs of one call fit the inputs of the next without recompiling.
    """
    train = functools.partial(train_step, graphdef=graphdef, tx=tx, loss_fn=loss_fn,
                              ema_decay=ema_decay, augment=augment, mix=mix,
                              accumulate_steps=accumulate_steps, statistics=statistics)
    pinned = {} if replicated is None else {"out_shardings": replicated}
    options = {"donate_argnums": 0, "compiler_options": cpu_compiler_options(), **pinned}
    evals = make_eval_steps(graphdef, tta_flip, tta_shift, statistics)
    monitor = make_eval_steps(graphdef, statistics=statistics) if tta_flip or tta_shift \
        else evals
    return Steps(
        train_step=jax.jit(train, **options),
        train_scan=jax.jit(functools.partial(scan_train_steps, step_fn=train), **options),
        train_batches=jax.jit(functools.partial(scan_train_batches, step_fn=train),
                              **options),
        eval_step=evals.eval_step, eval_batches=evals.eval_batches,
        monitor_batches=monitor.eval_batches)


class EvalSteps(NamedTuple):
    eval_step: Callable
    eval_batches: Callable


def make_eval_steps(graphdef: nnx.GraphDef, tta_flip: bool = False,
                    tta_shift: int = 0,
                    statistics: Statistics = FASHION_MNIST_STATISTICS) -> EvalSteps:
    """The jitted inference functions alone (no optimizer or loss needed)."""
    options = {"compiler_options": cpu_compiler_options()}
    bound = {"graphdef": graphdef, "tta_flip": tta_flip,
             "tta_shift": tta_shift, "statistics": statistics}
    return EvalSteps(
        eval_step=jax.jit(functools.partial(eval_step, **bound), **options),
        eval_batches=jax.jit(functools.partial(eval_batches, **bound), **options))
