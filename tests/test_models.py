"""Our models: parameter counts, shapes, and the Flax conventions they follow."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fmnist_jax.config import preset
from fmnist_jax.kernels import cpu_compiler_options
from fmnist_jax.models import (CNN, ResNet, count_params, create_model, whiten_first_convolution,
                               whitening_filters)


@pytest.mark.parametrize("name, expected", [("mlp", 266_610), ("cnn_seed", 1_199_882),
                                            ("cnn", 390_858)])
def test_parameter_counts(name, expected):
    model = create_model(name, rngs=nnx.Rngs(0))
    assert count_params(model) == expected
    assert model(jnp.zeros((3, 28, 28, 1))).shape == (3, 10)


def test_resnet_parameter_count_and_shapes():
    # Stem 1*9*64+64; stage 1: 2 blocks of 2 convs 64->64 (+BN); stage 2: convs 64->128,
    # 128->128 x3, a 1x1 projection; stage 3 likewise at 256; final BN and Dense 10.
    model = create_model("resnet", features=(64, 128, 256), blocks=2, rngs=nnx.Rngs(0))
    assert count_params(model) == 2_777_610
    small = create_model("resnet", features=(8, 16), blocks=1, rngs=nnx.Rngs(0))
    conv = lambda a, b: 9 * a * b + b  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    assert count_params(small) == (conv(1, 8) + bn(8) + conv(8, 8) + bn(8) + conv(8, 8)
                                   + bn(8) + conv(8, 16) + bn(16) + conv(16, 16) + 8 * 16
                                   + bn(16) + 16 * 10 + 10)
    assert small(jnp.zeros((2, 28, 28, 1))).shape == (2, 10)


def test_configurable_widths():
    assert count_params(create_model("mlp", rngs=nnx.Rngs(0), hidden=(64,))) == \
        784 * 64 + 64 + 64 * 10 + 10
    # Two blocks: 28 -> 14 -> 7, no batch norm.
    cnn = CNN(features=(8, 16), dense=32, batch_norm=False, rngs=nnx.Rngs(0))
    assert count_params(cnn) == (9 * 8 + 8) + (9 * 8 * 16 + 16) + (7 * 7 * 16 * 32 + 32) + \
        (32 * 10 + 10)


@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn_seed"])
def test_modes_the_flax_way(name):
    """model.train(): dropout masks from the model's own RNG streams (a fresh mask every
    call, the stream's count advancing), batch statistics updated; model.eval(): neither,
    the same output every call."""
    model = create_model(name, rngs=nnx.Rngs(params=0, dropout=1))
    x = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
    counts = lambda: [int(v[...]) for v in jax.tree.leaves(  # noqa: E731
        nnx.state(model, nnx.RngCount), is_leaf=lambda v: isinstance(v, nnx.Variable))]
    model.train()
    before = counts()
    a, b = model(x), model(x)
    assert not np.allclose(a, b)  # dropout: a new mask each call
    assert all(n > m for n, m in zip(counts(), before)) and counts()
    model.eval()
    c, d = model(x), model(x)
    np.testing.assert_array_equal(c, d)
    assert not np.allclose(a, c)
    # The same seed, the same masks: the RNG state is the model's.
    again = create_model(name, rngs=nnx.Rngs(params=0, dropout=1))
    np.testing.assert_array_equal(again(x), a)


def test_batch_norm_statistics_move_only_in_training():
    model = create_model("cnn", features=(4,), dense=8, rngs=nnx.Rngs(0))
    stats = lambda: [np.asarray(v) for v in jax.tree.leaves(  # noqa: E731
        nnx.state(model, nnx.BatchStat))]
    x = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
    start = stats()
    model.eval()
    model(x)
    assert all(np.array_equal(a, b) for a, b in zip(start, stats()))
    model.train()
    model(x)
    assert not any(np.array_equal(a, b) for a, b in zip(start, stats()))


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        create_model("vgg", rngs=nnx.Rngs(0))


def _resnet_loss(model, x, labels):
    """``loss(params, rest) -> (loss, rest after the step)`` of ``model`` in training mode."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest):
        m = nnx.merge(graphdef, params, rest, copy=True)
        value = optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()
        return value, nnx.state(m, nnx.Not(nnx.Param))

    return loss, params, rest


def test_resnet_recomputes_its_blocks_on_cpu():
    """On a CPU (with our compiler options) the preset's ResNet keeps only each block's
    input for the backward pass: its gradient at batch 128 needs 552 MiB of temporaries,
    977 MiB when the blocks' activations are kept."""
    x, labels = jnp.zeros((128, 28, 28, 1)), jnp.zeros((128,), jnp.int32)
    model = create_model("resnet", rngs=nnx.Rngs(0), **preset("resnet").model_kwargs())
    loss, params, rest = _resnet_loss(model, x, labels)
    grad = jax.jit(jax.grad(loss, has_aux=True), compiler_options=cpu_compiler_options())
    temp = grad.lower(params, rest).compile().memory_analysis().temp_size_in_bytes
    assert temp < 700 * 2**20, temp / 2**20


def test_resnet_recomputation_changes_no_result():
    """Loss, gradients, batch statistics and RNG counts (dropout on) are bitwise those of
    keeping the activations."""
    x = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
    labels = jnp.arange(8) % 10
    results = []
    for remat in (True, False):
        model = ResNet((8, 16), blocks=1, dropout=0.2, remat_on_cpu=remat,
                       rngs=nnx.Rngs(params=0, dropout=1))
        loss, params, rest = _resnet_loss(model, x, labels)
        results.append(jax.jit(jax.value_and_grad(loss, has_aux=True),
                               compiler_options=cpu_compiler_options())(params, rest))
    raw = lambda v: (jax.random.key_data(v)  # noqa: E731
                     if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
    leaves = [jax.tree.leaves(jax.tree.map(raw, r)) for r in results]
    assert len(leaves[0]) == len(leaves[1]) > 20
    for a, b in zip(*leaves):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["cnn", "cnn_seed", "resnet"])
def test_cpu_kernels_train_on_xlas_gradients(name, monkeypatch):
    """Each CNN as a CPU trains it (im2col convolutions, our pooling, recomputed ResNet
    blocks) against the same model on XLA's kernels (lax convolutions, nnx.max_pool and
    nnx.avg_pool), as a GPU or TPU runs it, on images with black backgrounds, where a third
    of the pooling windows tie. In float64 the loss and every gradient are XLA's to 1e-12
    (of the largest gradient): the same math, ties included. In float32, ours are within
    1e-5 of that float64 reference. XLA's own float32 gradients are no reference: jaxlib
    0.12.1's are 5.7e-5 off float64 on this ResNet (ours 2.9e-7; both 3-5e-7 with jaxlib
    0.10.2). Dropout is off: its masks depend on the dtype, and it is no kernel."""
    from test_kernels import flat_background_images, standardised

    from fmnist_jax import models

    x = standardised(flat_background_images(16))
    labels = jnp.arange(16) % 10
    kwargs = {"features": (8, 16), "blocks": 1} if name == "resnet" else {}
    if name == "cnn":
        kwargs = {"features": (8, 16, 16), "dense": 32}
    cpu = create_model(name, rngs=nnx.Rngs(0), **kwargs)
    xla = nnx.clone(cpu)
    for _, module in nnx.iter_modules(xla):
        if isinstance(module, nnx.Conv):
            module.conv_general_dilated = jax.lax.conv_general_dilated
    if name == "resnet":
        xla.remat_on_cpu = False

    def gradients(model, dtype):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            m.train()
            for _, module in nnx.iter_modules(m):
                if isinstance(module, nnx.Dropout):
                    module.deterministic = True
            logits = m(x.astype(dtype))
            assert logits.dtype == dtype
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        cast = lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v  # noqa
        params, rest = jax.tree.map(cast, params), jax.tree.map(cast, rest)
        value, grad = jax.jit(jax.value_and_grad(loss))(params)
        return np.asarray(value), [np.asarray(g) for g in jax.tree.leaves(grad)]

    value32, grad32 = gradients(cpu, jnp.float32)
    with jax.enable_x64(True):
        value64, grad64 = gradients(cpu, jnp.float64)
        monkeypatch.setattr(models, "max_pool_2x2", functools.partial(
            nnx.max_pool, window_shape=(2, 2), strides=(2, 2), padding="VALID"))
        monkeypatch.setattr(models, "avg_pool_2x2", functools.partial(
            nnx.avg_pool, window_shape=(2, 2), strides=(2, 2), padding="VALID"))
        value_xla, grad_xla = gradients(xla, jnp.float64)
    scale = max(np.abs(g).max() for g in grad_xla)
    assert len(grad64) == len(grad_xla) > 5
    np.testing.assert_allclose(value64, value_xla, rtol=1e-12)
    for a, b in zip(grad64, grad_xla):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(value32, value_xla, rtol=1e-6)
    for a, b in zip(grad32, grad_xla):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("channels", [1, 3])
def test_whitening_filters_whiten_the_patches_a_convolution_sees(channels):
    rng = np.random.default_rng(0)
    # Correlated pixels: smoothed noise, scaled per channel
    noise = rng.normal(size=(64, 16, 16, channels))
    images = (noise + np.roll(noise, 1, 1) + 0.5 * np.roll(noise, 1, 2)) * np.arange(
        1, channels + 1)
    filters = whitening_filters(images, eps=0.0)
    d = 9 * channels
    assert filters.shape == (3, 3, channels, 2 * d)
    np.testing.assert_array_equal(filters[..., 1::2], -filters[..., 0::2])
    # Through a SAME convolution, as the model applies them: unit, uncorrelated outputs
    out = jax.lax.conv_general_dilated(
        jnp.asarray(images, jnp.float32), jnp.asarray(filters[..., 0::2]), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.cov(np.asarray(out).reshape(-1, d), rowvar=False),
                               np.eye(d), atol=2e-3)
    # Largest variance first: the unscaled directions' variances fall
    norms = np.linalg.norm(filters[..., 0::2].reshape(d, d), axis=0)
    assert np.all(np.diff(norms) >= 0)  # 1/sqrt(variance) grows


def test_whiten_first_convolution_replaces_the_first_filters_only():
    images = np.random.default_rng(1).normal(size=(32, 28, 28, 1))
    filters = whitening_filters(images)  # 18 filters
    cnn = CNN(rngs=nnx.Rngs(0))  # 32 filters
    before = np.asarray(cnn.convs[0].kernel[...])
    bias = np.asarray(cnn.convs[0].bias[...])
    whiten_first_convolution(cnn, filters)
    after = np.asarray(cnn.convs[0].kernel[...])
    np.testing.assert_array_equal(after[..., :18], filters)
    np.testing.assert_array_equal(after[..., 18:], before[..., 18:])
    np.testing.assert_array_equal(np.asarray(cnn.convs[0].bias[...]), bias)
    colour = whitening_filters(np.random.default_rng(2).normal(size=(8, 12, 12, 3)))
    resnet = ResNet((8, 16), 1, image_shape=(12, 12, 3), rngs=nnx.Rngs(0))  # 8 < 54
    whiten_first_convolution(resnet, colour)
    np.testing.assert_array_equal(np.asarray(resnet.stem.kernel[...]), colour[..., :8])
    with pytest.raises(ValueError, match=r"do not fit the first convolution's kernel"):
        whiten_first_convolution(cnn, colour)
    with pytest.raises(TypeError, match="MLP is not this library's CNN or ResNet"):
        whiten_first_convolution(create_model("mlp", rngs=nnx.Rngs(0)), filters)
