"""Optax optimizers and learning-rate schedules, by name.

Schedules are functions of the optimizer step and are built from epochs, so the same flags
mean the same thing at any batch size. Gradient clipping comes first in the chain, then
weight decay (decoupled for ``adamw``, added to the gradient for the others; kernels only,
never biases or batch-norm scales).
"""

from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("sgd", "adam", "adamw", "adadelta", "rmsprop", "muon")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "exponential", "piecewise", "onecycle")


def make_schedule(name: str, learning_rate: float, total_steps: int, steps_per_epoch: int, *,
                  warmup_epochs: float = 1.0, decay_rate: float = 0.9,
                  final_lr_fraction: float = 0.0) -> optax.Schedule:
    """The learning rate as a function of the step.

    - ``constant``: ``learning_rate`` throughout.
    - ``cosine``: cosine decay from ``learning_rate`` to ``final_lr_fraction`` of it.
    - ``warmup_cosine``: linear warm-up from 0 over ``warmup_epochs``, then cosine decay.
    - ``exponential``: multiplied by ``decay_rate`` every epoch (continuously).
    - ``piecewise``: divided by 10 at 50% and again at 75% of training.
    - ``onecycle``: cosine one-cycle (up to ``learning_rate`` at 30%, then down).
    """
    total_steps = max(total_steps, 1)
    end = learning_rate * final_lr_fraction
    if name == "constant":
        return optax.constant_schedule(learning_rate)
    if name == "cosine":
        return optax.cosine_decay_schedule(learning_rate, total_steps, alpha=final_lr_fraction)
    if name == "warmup_cosine":
        warmup = min(int(warmup_epochs * steps_per_epoch), total_steps - 1)
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, total_steps, end)
    if name == "exponential":
        return optax.exponential_decay(learning_rate, steps_per_epoch, decay_rate)
    if name == "piecewise":
        return optax.piecewise_constant_schedule(
            learning_rate, {total_steps // 2: 0.1, (3 * total_steps) // 4: 0.1})
    if name == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, learning_rate)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def _kernels_only(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _muon_axes(params):
    """Muon's matrices: each convolution kernel (height, width, in, out) as a matrix of
    (height x width x in) rows and ``out`` columns; every other parameter goes to Adam."""
    conv = optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
    return jax.tree.map(lambda p: conv if p.ndim == 4 else None, params)


def make_optimizer(name: str, schedule: optax.Schedule, *, momentum: float = 0.9,
                   nesterov: bool = False, weight_decay: float = 0.0,
                   clip_grad_norm: float = 0.0) -> optax.GradientTransformation:
    """A named optimizer with the given schedule, clipping and weight decay.

    ``momentum`` and ``nesterov`` apply to ``sgd``; ``adadelta`` uses the Keras constants
    (rho 0.95, epsilon 1e-7) so that the seed CNN's ``lr=1.0`` means what it meant there;
    ``rmsprop`` uses rho 0.9 as Keras does. ``muon`` orthogonalises the updates of
    convolution kernels (Newton-Schulz, scaled to Adam's RMS so that one learning rate
    serves both) and gives dense layers, biases and batch-norm parameters to Adam.
    """
    if name == "sgd":
        core = optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov)
    elif name == "adam":
        core = optax.adam(schedule)
    elif name == "adamw":
        core = optax.adamw(schedule, weight_decay=weight_decay, mask=_kernels_only)
    elif name == "adadelta":
        core = optax.adadelta(schedule, rho=0.95, eps=1e-7)
    elif name == "muon":
        core = optax.contrib.muon(schedule, consistent_rms=0.2,
                                  muon_weight_dimension_numbers=_muon_axes)
    elif name == "rmsprop":
        core = optax.rmsprop(schedule, decay=0.9, eps=1e-7)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    chain = []
    if clip_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(clip_grad_norm))
    if weight_decay > 0 and name != "adamw":
        chain.append(optax.add_decayed_weights(weight_decay, mask=_kernels_only))
    return optax.chain(*chain, core) if chain else core
