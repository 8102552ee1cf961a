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


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
def test_max_pool_matches_nnx(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    expected = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    np.testing.assert_array_equal(max_pool_2x2(x), expected)
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(max_pool_2x2(x) ** 2))(x),
        jax.grad(lambda x: jnp.sum(nnx.max_pool(x, (2, 2), (2, 2), "VALID") ** 2))(x))


def test_dropout_only_in_training():
    model = create_model("mlp", rngs=nnx.Rngs(0))
    x = jnp.ones((4, 28, 28, 1))
    np.testing.assert_array_equal(model(x), model(x, train=False))
    a = model(x, train=True, rngs=nnx.Rngs(dropout=1))
    b = model(x, train=True, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(a, b)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        create_model("resnet", rngs=nnx.Rngs(0))
