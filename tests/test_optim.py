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


def _two_steps(name, lr=0.1, **kwargs):
    """Two updates of w = [[2.0]] with gradients 1.0 then 3.0."""
    tx = make_optimizer(name, optax.constant_schedule(lr), **kwargs)
    params = {"w": jnp.array([[2.0]])}
    state = tx.init(params)
    out = []
    for g in (1.0, 3.0):
        updates, state = tx.update({"w": jnp.array([[g]])}, state, params)
        out.append(float(updates["w"][0, 0]))
    return out


def test_each_optimizer_step_is_exact():
    """One hand-computed update pair per optimizer, with the constants that matter: Adam's
    (0.9, 0.999, 1e-8), Keras's Adadelta (rho 0.95, eps 1e-7) and RMSprop (rho 0.9, eps
    1e-7), SGD's momentum and Nesterov."""
    # SGD with momentum 0.9: v1 = 1, v2 = 0.9 + 3 = 3.9.
    assert _two_steps("sgd", momentum=0.9) == pytest.approx([-0.1, -0.39])
    # Nesterov: g + 0.9 v = 1 + 0.9; 3 + 0.9 * 3.9.
    assert _two_steps("sgd", momentum=0.9, nesterov=True) == pytest.approx(
        [-0.19, -0.1 * (3 + 0.9 * 3.9)])
    # Adam: m1 = 0.1, v1 = 0.001 -> m^ = 1, v^ = 1: -lr; step 2: m = 0.39, v = 0.009999.
    m, v = 0.09 + 0.3, 0.999e-3 + 0.009
    m_hat, v_hat = m / (1 - 0.9 ** 2), v / (1 - 0.999 ** 2)
    assert _two_steps("adam") == pytest.approx(
        [-0.1 * 1 / (1 + 1e-8), -0.1 * m_hat / (np.sqrt(v_hat) + 1e-8)], rel=1e-5)
    # Adadelta (Keras constants): E[g2] = 0.05 g2; step = sqrt(E[dx2] + eps) /
    # sqrt(E[g2] + eps) * g; E[dx2] = 0.05 dx2.
    eps, rho = 1e-7, 0.95
    g2 = (1 - rho) * 1.0
    dx1 = np.sqrt(eps) / np.sqrt(g2 + eps) * 1.0
    g2b = rho * g2 + (1 - rho) * 9.0
    dx2 = np.sqrt((1 - rho) * dx1 ** 2 + eps) / np.sqrt(g2b + eps) * 3.0
    assert _two_steps("adadelta", lr=1.0) == pytest.approx([-dx1, -dx2], rel=1e-4)
    # RMSprop (rho 0.9, eps 1e-7): nu1 = 0.1, nu2 = 0.09 + 0.9.
    assert _two_steps("rmsprop", lr=0.01) == pytest.approx(
        [-0.01 / (np.sqrt(0.1) + 1e-7), -0.03 / (np.sqrt(0.99) + 1e-7)], rel=1e-5)


def test_adamw_decays_kernels_only_on_real_model_params():
    """Decoupled decay (lr * wd * w) on kernels, none on biases or batch-norm scales, with
    the nnx.State of a real model."""
    from flax import nnx

    from fmnist_jax.models import create_model

    params = nnx.state(create_model("cnn", features=(4,), dense=8, rngs=nnx.Rngs(0)),
                       nnx.Param)
    tx = make_optimizer("adamw", optax.constant_schedule(0.1), weight_decay=0.5)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)  # zero gradients: decay alone
    for (path, update), p in zip(jax.tree.leaves_with_path(updates), jax.tree.leaves(params)):
        expected = -0.1 * 0.5 * p if p.ndim > 1 else jnp.zeros_like(p)
        np.testing.assert_allclose(update, expected, rtol=1e-6, err_msg=str(path))
    assert sum(p.ndim > 1 for p in jax.tree.leaves(params)) == 3  # conv, dense, head kernels


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


def test_muon_orthogonalises_convolution_kernels_and_gives_the_rest_to_adam():
    """A convolution kernel's update, as a (3 x 3 x in) by out matrix, has its singular
    values pulled together (Newton-Schulz) and its RMS scaled to 0.2 x lr (consistent_rms);
    a dense kernel and a bias get the first step of Adam with Nesterov momentum (optax's
    muon uses NAdam): m^ = 0.9 x 0.1 g / (1 - 0.9^2) + 0.1 g / (1 - 0.9), over |g|."""
    grads = {"conv": jax.random.normal(jax.random.key(0), (3, 3, 8, 16)) *
             jnp.linspace(0.1, 10.0, 16),  # columns of very different scales
             "dense": jnp.array([[0.5, -2.0], [3.0, 1e-3]]), "bias": jnp.array([-4.0, 0.1])}
    params = jax.tree.map(jnp.zeros_like, grads)
    tx = make_optimizer("muon", optax.constant_schedule(0.01))
    updates, _ = tx.update(grads, tx.init(params), params)
    nadam = 0.09 / 0.19 + 1.0
    for name in ("dense", "bias"):
        np.testing.assert_allclose(updates[name], -0.01 * nadam * np.sign(grads[name]),
                                   rtol=1e-4)
    singular = np.linalg.svd(np.asarray(updates["conv"]).reshape(72, 16), compute_uv=False)
    raw = np.linalg.svd(np.asarray(grads["conv"]).reshape(72, 16), compute_uv=False)
    assert raw.max() / raw.min() > 100 and singular.max() / singular.min() < 2.0
    rms = float(jnp.sqrt(jnp.mean(updates["conv"] ** 2)))
    assert rms == pytest.approx(0.01 * 0.2, rel=0.3)
