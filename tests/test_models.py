"""Parameter counts, and our fast conv and pool against the library ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmnist_jax.models import CNN, Conv, conv2d, count_params, create_model, max_pool_2x2


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
    assert small(jnp.zeros((2, 28, 28, 1)), train=True).shape == (2, 10)


def test_configurable_widths():
    assert count_params(create_model("mlp", rngs=nnx.Rngs(0), hidden=(64,))) == \
        784 * 64 + 64 + 64 * 10 + 10
    # Two blocks: 28 -> 14 -> 7, no batch norm.
    cnn = CNN(features=(8, 16), dense=32, batch_norm=False, rngs=nnx.Rngs(0))
    assert count_params(cnn) == (9 * 8 + 8) + (9 * 8 * 16 + 16) + (7 * 7 * 16 * 32 + 32) + \
        (32 * 10 + 10)


@pytest.mark.parametrize("k, padding", [(3, "SAME"), (3, "VALID"), (5, "SAME"), (2, "SAME")])
def test_conv_matches_lax_conv_and_its_gradients(k, padding):
    conv = Conv(3, 4, k, padding, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, 8, 3))

    def reference(kernel, bias, x):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias

    def ours(kernel, bias, x):
        return conv2d(x, kernel, bias, padding)

    args = (conv.kernel[...], conv.bias[...] + 0.1, x)
    np.testing.assert_allclose(ours(*args), reference(*args), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Conv.__call__(conv, x), reference(conv.kernel[...],
                                                                 conv.bias[...], x), atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    for g_ours, g_ref in zip(jax.grad(loss(ours), (0, 1, 2))(*args),
                             jax.grad(loss(reference), (0, 1, 2))(*args)):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv_custom_gradient_matches_autodiff_of_the_slices(padding):
    """The custom VJP against JAX's own gradient of the same slices-and-matmul function,
    jitted, at a width where the matmuls are blocked (16 -> 24 channels)."""
    keys = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(keys[0], (3, 12, 10, 16))
    kernel = jax.random.normal(keys[1], (3, 3, 16, 24)) * 0.1
    bias = jax.random.normal(keys[2], (24,))
    target = jax.random.normal(keys[3], (3, 12, 10, 24) if padding == "SAME" else
                               (3, 10, 8, 24))

    def slices(x, kernel, bias):  # the plain formula, differentiated by JAX
        lo, hi = (1, 1) if padding == "SAME" else (0, 0)
        xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
        ho, wo = xp.shape[1] - 2, xp.shape[2] - 2
        patches = jnp.concatenate([xp[:, i:i + ho, j:j + wo] for i in range(3)
                                   for j in range(3)], axis=-1)
        return patches @ kernel.reshape(-1, 24) + bias

    loss = lambda f: lambda *a: jnp.sum(jnp.tanh(f(*a)) * target)  # noqa: E731
    ours = jax.jit(jax.value_and_grad(loss(lambda *a: conv2d(*a, padding)), (0, 1, 2)))
    ref = jax.jit(jax.value_and_grad(loss(slices), (0, 1, 2)))
    (v1, g1), (v2, g2) = ours(x, kernel, bias), ref(x, kernel, bias)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
def test_max_pool_matches_nnx(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    expected = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    np.testing.assert_array_equal(max_pool_2x2(x), expected)
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(max_pool_2x2(x) ** 2))(x),
        jax.grad(lambda x: jnp.sum(nnx.max_pool(x, (2, 2), (2, 2), "VALID") ** 2))(x))


def test_max_pool_after_relu_has_autodiffs_gradient():
    """With many all-zero windows (ReLU of mostly negative inputs), relu -> pool has
    exactly the gradient of autodiff through the plain reshape-max."""
    x = jax.random.normal(jax.random.key(1), (3, 8, 10, 4)) - 1.0
    w = jax.random.normal(jax.random.key(2), (3, 4, 5, 4))

    def plain(x):
        n, h, wd, c = x.shape
        return x.reshape(n, h // 2, 2, wd // 2, 2, c).max(axis=(2, 4))

    ours = jax.grad(lambda x: jnp.sum(max_pool_2x2(jax.nn.relu(x)) * w))(x)
    ref = jax.grad(lambda x: jnp.sum(plain(jax.nn.relu(x)) * w))(x)
    assert float((plain(jax.nn.relu(x)) == 0).mean()) > 0.3  # ties are really there
    np.testing.assert_array_equal(ours, ref)


def test_dropout_only_in_training():
    model = create_model("mlp", rngs=nnx.Rngs(0))
    x = jnp.ones((4, 28, 28, 1))
    a = model(x, train=True, rngs=nnx.Rngs(dropout=1))
    b = model(x, train=True, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(a, b)  # training: the key decides the mask
    # Inference: no dropout, whatever the key; and not the training output.
    c = model(x, train=False, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(c, model(x, train=False, rngs=nnx.Rngs(dropout=2)))
    assert not np.allclose(a, c)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        create_model("vgg", rngs=nnx.Rngs(0))
