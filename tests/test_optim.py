"""Exact schedule values and the optimizer chain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmnist_jax.optim import OPTIMIZERS, make_optimizer, make_schedule

# 10 epochs of 100 steps.
TOTAL, PER_EPOCH = 1000, 100


@pytest.mark.parametrize("name, expected", [
    ("constant", {0: 0.1, 500: 0.1, 1000: 0.1}),
    ("cosine", {0: 0.1, 250: 0.1 * (1 + np.cos(np.pi / 4)) / 2, 500: 0.05, 1000: 0.0}),
    # 1 epoch of linear warm-up, then cosine over the remaining 900 steps.
    ("warmup_cosine", {0: 0.0, 50: 0.05, 100: 0.1, 550: 0.05, 1000: 0.0}),
    ("exponential", {0: 0.1, 100: 0.09, 200: 0.081, 50: 0.1 * 0.9 ** 0.5}),
    ("piecewise", {0: 0.1, 499: 0.1, 500: 0.01, 749: 0.01, 750: 0.001, 1000: 0.001}),
    # cosine one-cycle: from lr/25 up to lr at 30%, then down to lr/25/1e4.
    ("onecycle", {0: 0.1 / 25, 300: 0.1, 1000: 0.1 / 25 / 1e4}),
])
def test_schedule_values(name, expected):
    schedule = make_schedule(name, 0.1, TOTAL, PER_EPOCH, warmup_epochs=1.0, decay_rate=0.9)
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-5, abs=1e-9), step


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear", 0.1, TOTAL, PER_EPOCH)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs", optax.constant_schedule(0.1))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_descends(name):
    params = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([0.5])}
    loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)  # noqa: E731
    lr = 1.0 if name == "adadelta" else 0.05
    tx = make_optimizer(name, optax.constant_schedule(lr), weight_decay=0.01)
    state = tx.init(params)
    start = loss(params)
    for _ in range(20):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert loss(params) < start


def test_sgd_step_is_exact():
    params = {"w": jnp.array([[2.0]])}
    grads = {"w": jnp.array([[1.0]])}
    tx = make_optimizer("sgd", optax.constant_schedule(0.1), momentum=0.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(updates["w"][0, 0]) == pytest.approx(-0.1)
    # Weight decay adds wd * w to the gradient of kernels (ndim > 1) only.
    tx = make_optimizer("sgd", optax.constant_schedule(0.1), momentum=0.0, weight_decay=0.5)
    p = {"w": jnp.array([[2.0]]), "b": jnp.array([2.0])}
    updates, _ = tx.update({"w": jnp.array([[1.0]]), "b": jnp.array([1.0])}, tx.init(p), p)
    assert float(updates["w"][0, 0]) == pytest.approx(-0.1 * (1.0 + 0.5 * 2.0))
    assert float(updates["b"][0]) == pytest.approx(-0.1)


def test_clipping():
    tx = make_optimizer("sgd", optax.constant_schedule(1.0), momentum=0.0, clip_grad_norm=1.0)
    p = {"w": jnp.zeros((1, 2))}
    updates, _ = tx.update({"w": jnp.array([[3.0, 4.0]])}, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], [[-0.6, -0.8]], rtol=1e-6)
