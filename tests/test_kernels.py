"""The per-platform kernels: on a CPU our formulations, elsewhere XLA's; each checked against
the other, values and gradients (the CPU runs both: ``im2col_conv`` and ``_max_pool_cpu``
are called directly, ``lax`` and ``nnx`` give the reference)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmnist_jax import kernels
from fmnist_jax.kernels import conv_general_dilated, im2col_conv, max_pool_2x2

NHWC = ("NHWC", "HWIO", "NHWC")


def _lax(padding):
    return lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), padding,
                                                     dimension_numbers=NHWC)


@pytest.mark.parametrize("kernel, padding", [((3, 3), "SAME"), ((3, 3), "VALID"),
                                             ((5, 5), "SAME"), ((2, 2), "SAME"),
                                             ((3, 2), "SAME"), ((3, 3), ((2, 0), (1, 3)))])
def test_conv_equals_lax_values_and_gradients(kernel, padding):
    x = jax.random.normal(jax.random.key(1), (2, 9, 8, 3))
    k = jax.random.normal(jax.random.key(2), (*kernel, 3, 4))
    ours = lambda x, k: conv_general_dilated(x, k, (1, 1), padding,  # noqa: E731
                                             dimension_numbers=NHWC)
    np.testing.assert_allclose(ours(x, k), _lax(padding)(x, k), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
    for g_ours, g_ref in zip(jax.grad(loss(ours), (0, 1))(x, k),
                             jax.grad(loss(_lax(padding)), (0, 1))(x, k)):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-4)


def test_the_cpu_runs_im2col_and_other_convolutions_stay_native():
    x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    ours = lambda x, k: conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                             dimension_numbers=NHWC)
    cpu = jax.jit(jax.grad(lambda x, k: ours(x, k).sum(), (0, 1))).lower(x, k).as_text()
    assert "dot_general" in cpu  # both gradients as matmuls, no convolution left
    assert "convolution" not in cpu
    for strides, dilation, groups in (((2, 2), None, 1), ((1, 1), (2, 2), 1),
                                      ((1, 1), None, 3)):
        kk = k if groups == 1 else jnp.ones((3, 3, 1, 3))
        args = (x, kk, strides, "SAME")
        kwargs = dict(rhs_dilation=dilation, dimension_numbers=NHWC,
                      feature_group_count=groups)
        np.testing.assert_array_equal(conv_general_dilated(*args, **kwargs),
                                      jax.lax.conv_general_dilated(*args, **kwargs))
        text = jax.jit(lambda x: conv_general_dilated(x, *args[1:], **kwargs)).lower(
            x).as_text()
        assert "convolution" in text and "dot_general" not in text


@pytest.mark.parametrize("pads, chunk, large", [
    (((1, 1), (1, 1)), 0, False), (((0, 0), (0, 0)), 0, False), (((1, 1), (1, 1)), 0, True),
    (((0, 0), (0, 0)), 0, True), (((1, 1), (1, 1)), 1, False), (((0, 0), (0, 0)), 3, False)])
def test_custom_gradient_equals_autodiff_of_the_same_slices(pads, chunk, large, monkeypatch):
    """The custom VJP against JAX's own gradient of the slices-and-matmul function, jitted,
    at a width where the matmuls are blocked (16 -> 24 channels); with the patches kept
    (chunk 0), as small or as large patches (the kernel's gradient in two halves, the
    input's over slices of 1 image), and recomputed over slices of 1 and 3 images."""
    if large:
        monkeypatch.setattr(kernels, "_LARGE_PATCHES_BYTES", 0)
        monkeypatch.setattr(kernels, "_CHUNK_BYTES", 1)
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (3, 12, 10, 16))
    kernel = jax.random.normal(keys[1], (3, 3, 16, 24)) * 0.1
    ho, wo = 12 + sum(pads[0]) - 2, 10 + sum(pads[1]) - 2
    target = jax.random.normal(keys[2], (3, ho, wo, 24))

    def slices(x, kernel):  # the plain formula, differentiated by JAX
        xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        patches = jnp.concatenate([xp[:, i:i + ho, j:j + wo] for i in range(3)
                                   for j in range(3)], axis=-1)
        return patches @ kernel.reshape(-1, 24)

    loss = lambda f: lambda *a: jnp.sum(jnp.tanh(f(*a)) * target)  # noqa: E731
    ours = jax.jit(jax.value_and_grad(
        loss(lambda x, k: kernels._im2col(x, k, pads, chunk)), (0, 1)))
    ref = jax.jit(jax.value_and_grad(loss(slices), (0, 1)))
    (v1, g1), (v2, g2) = ours(x, kernel), ref(x, kernel)
    hlo = ours.lower(x, kernel).as_text()
    assert ("stablehlo.while" in hlo) == bool(chunk or large)  # slices, one at a time
    assert ("batching_dims" in hlo) == large  # the kernel's gradient over 2 halves
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("chunk, large", [(0, False), (0, True), (2, False)])
def test_bfloat16_convolution_equals_lax_within_bfloat16_rounding(chunk, large, monkeypatch):
    """On bfloat16 operands: bfloat16 values and gradients, equal to XLA's convolution and
    its gradient on the same (bfloat16) numbers computed in float32, within bfloat16's
    rounding; every matmul sums in float32 (a bfloat16 result was XLA:CPU's slow path). With
    the patches kept (small or large) and recomputed over slices of 2 images."""
    if large:
        monkeypatch.setattr(kernels, "_LARGE_PATCHES_BYTES", 0)
    keys = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(keys[0], (4, 10, 9, 16)).astype(jnp.bfloat16)
    kernel = (jax.random.normal(keys[1], (3, 3, 16, 24)) * 0.1).astype(jnp.bfloat16)
    target = jax.random.normal(keys[2], (4, 10, 9, 24))
    pads = ((1, 1), (1, 1))

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.tanh(conv(x, k).astype(jnp.float32)) * target)

    ours = jax.jit(jax.value_and_grad(
        loss(lambda x, k: kernels._im2col(x, k, pads, chunk)), (0, 1)))
    ref = jax.jit(jax.value_and_grad(loss(_lax(pads)), (0, 1)))
    (v1, g1), (v2, g2) = ours(x, kernel), ref(x.astype(jnp.float32),
                                                kernel.astype(jnp.float32))
    assert kernels._im2col(x, kernel, pads, chunk).dtype == jnp.bfloat16
    np.testing.assert_allclose(v1, v2, rtol=2e-2)
    for a, b in zip(g1, g2):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(a.astype(jnp.float32), b,
                                   atol=2e-2 * float(jnp.abs(b).max()))
    hlo = ours.lower(x, kernel).as_text()
    dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) >= 3 and all(line.endswith("xf32>") for line in dots), dots


def test_large_patches_are_recomputed_over_slices_of_the_batch():
    """The ResNet's 28x28 layers (231 MB of patches at batch 128) are not held whole: the
    compiled gradient of one such layer needs a fraction of its patches in temporaries (it
    needed 1.8 times them when they were kept); the seed CNN's conv2 (85 MB) keeps them."""
    x, k = jnp.zeros((128, 28, 28, 64)), jnp.zeros((3, 3, 64, 64))
    pads = ((1, 1), (1, 1))
    assert kernels._chunk(x, k, pads) == 4  # 4 images: 7.2 MB of patches
    assert kernels._chunk(jnp.zeros((128, 26, 26, 32)), jnp.zeros((3, 3, 32, 64)),
                          ((0, 0), (0, 0))) == 0
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(im2col_conv(x, k, pads) ** 2), (0, 1)))
    temp = grad.lower(x, k).compile().memory_analysis().temp_size_in_bytes
    patches = 128 * 28 * 28 * 9 * 64 * 4
    assert temp < 0.5 * patches, temp / patches


def test_users_nnx_conv_gets_the_fast_kernel_with_flaxs_results():
    """A user's nnx.Conv layers (default kernel) switched to ours: same outputs and
    gradients as Flax's own, the strided one left alone."""
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Conv(1, 8, (3, 3), rngs=rngs)
            self.b = nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs)
            self.c = nnx.Conv(8, 4, (5, 5), padding="VALID", rngs=rngs)

        def __call__(self, x):
            return self.c(nnx.relu(self.b(nnx.relu(self.a(x)))))

    flax_net = Net(nnx.Rngs(0))
    fast_net = nnx.clone(flax_net)
    assert kernels.use_fast_convolutions(fast_net) == 3
    assert fast_net.a.conv_general_dilated is conv_general_dilated
    assert flax_net.a.conv_general_dilated is jax.lax.conv_general_dilated  # untouched
    x = jax.random.normal(jax.random.key(3), (2, 28, 28, 1))
    np.testing.assert_allclose(fast_net(x), flax_net(x), rtol=1e-5, atol=1e-5)

    def grads(net):
        graphdef, params = nnx.split(net)
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)

    for g_fast, g_flax in zip(jax.tree.leaves(grads(fast_net)), jax.tree.leaves(grads(flax_net))):
        np.testing.assert_allclose(g_fast, g_flax, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------- inputs that tie, as real images do

def flat_background_images(n: int = 8, seed: int = 0) -> np.ndarray:
    """uint8 (n, 28, 28, 1) images like Fashion-MNIST's: a black background (a convolution
    gives the same output all over it, so pooling windows tie) and a garment of flat
    patches with a little texture."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28, 1), np.uint8)
    for image in images:
        top, left = rng.integers(2, 8, 2)
        bottom, right = rng.integers(20, 27, 2)
        image[top:bottom, left:right] = rng.choice([80, 160, 200])
        image[top + 3:bottom - 3:2, left + 2:right - 2] = rng.integers(0, 256)
        image[rng.integers(0, 28, 6), rng.integers(0, 28, 6)] = 255
    return images


def standardised(images: np.ndarray) -> jax.Array:
    return (jnp.asarray(images, jnp.float32) / 255.0 - 0.2860) / 0.3530


TIED_INPUTS = {
    "flat_background": lambda: standardised(flat_background_images()),
    "constant": lambda: jnp.full((2, 8, 10, 3), 0.7),
    "zeros": lambda: jnp.zeros((2, 8, 10, 3)),
    "integers": lambda: jnp.asarray(
        np.random.default_rng(1).integers(-2, 3, (3, 9, 7, 4)), jnp.float32),
    "odd_sizes": lambda: jnp.asarray(
        np.random.default_rng(2).integers(0, 2, (2, 7, 9, 2)), jnp.float32),
    "inf_and_nan": lambda: jnp.asarray(np.array(
        [[[-np.inf, -np.inf], [-np.inf, -np.inf]], [[np.nan, 1.0], [1.0, 2.0]],
         [[1.0, np.nan], [1.0, 1.0]], [[0.0, -0.0], [-0.0, 0.0]]], np.float32
    ).reshape(1, 2, 8, 1)),
}
MAX_POOL = functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2),
                             padding="VALID")


def _values_and_gradient(pool, x, weights):
    return jax.value_and_grad(lambda x: jnp.nansum(pool(x) * weights))(x)


@pytest.mark.parametrize("relu", [False, True], ids=["before_relu", "after_relu"])
@pytest.mark.parametrize("name", TIED_INPUTS)
def test_max_pool_gradient_goes_where_xlas_does(name, relu):
    """The CPU's pooling against nnx.max_pool (reduce_window and select-and-scatter, what
    GPUs and TPUs run) on inputs whose windows tie: the same values and the same gradient,
    exactly, the whole gradient to the first maximum of each window."""
    x = TIED_INPUTS[name]()
    if relu:
        x = jax.nn.relu(x)
    out = MAX_POOL(x).shape
    weights = jax.random.normal(jax.random.key(3), out)
    ties = (kernels._windows_2x2(x) == MAX_POOL(x)[:, :, None, :, None]).sum(axis=(2, 4))
    assert int((ties > 1).sum()) > 0  # the case this test is about is there
    for ours in (kernels._max_pool_cpu, max_pool_2x2):
        (v1, g1), (v2, g2) = (_values_and_gradient(ours, x, weights),
                              _values_and_gradient(MAX_POOL, x, weights))
        np.testing.assert_array_equal(ours(x), MAX_POOL(x))
        np.testing.assert_array_equal(v1, v2)
        np.testing.assert_array_equal(g1, g2)


def test_max_pool_gradient_is_one_per_window():
    """A constant image: one element of each window, the top-left one, gets the gradient
    (the old rule gave all four the whole of it)."""
    grad = jax.grad(lambda x: max_pool_2x2(x).sum())(jnp.ones((1, 4, 4, 1)))[0, :, :, 0]
    np.testing.assert_array_equal(grad, np.tile([[1.0, 0.0], [0.0, 0.0]], (2, 2)))


def test_avg_pool_equals_nnx_on_ties():
    for make in TIED_INPUTS.values():
        x = jnp.nan_to_num(make(), nan=0.5, neginf=-3.0)
        reference = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2),
                                      padding="VALID")
        weights = jax.random.normal(jax.random.key(4), reference(x).shape)
        (v1, g1), (v2, g2) = (_values_and_gradient(kernels._avg_pool_cpu, x, weights),
                              _values_and_gradient(reference, x, weights))
        np.testing.assert_allclose(kernels._avg_pool_cpu(x), reference(x), rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(v1, v2, rtol=1e-5)
        np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", ["kept", "large", "recomputed"])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv_then_pool_equals_xla_on_flat_backgrounds(path, padding, monkeypatch):
    """A 3x3 convolution and max pooling over images with black backgrounds (a third of the
    windows tie), ours (im2col with each of its backward paths, and the CPU's pooling)
    against lax.conv_general_dilated and nnx.max_pool: values and the kernel's, the bias's
    and the input's gradients within 1e-5."""
    if path == "large":
        monkeypatch.setattr(kernels, "_LARGE_PATCHES_BYTES", 0)
    if path == "recomputed":
        monkeypatch.setattr(kernels, "_KEEP_PATCHES_BYTES", 0)
        monkeypatch.setattr(kernels, "_CHUNK_BYTES", 1)
    x = standardised(flat_background_images(4))
    k1 = jax.random.normal(jax.random.key(5), (3, 3, 1, 8)) * 0.3
    k2 = jax.random.normal(jax.random.key(6), (3, 3, 8, 16)) * 0.1
    bias = jnp.linspace(-0.2, 0.2, 16)

    def net(conv, pool):
        def f(x, k1, k2, bias):
            y = pool(conv(x, k1))
            y = pool(jax.nn.relu(conv(y, k2) + bias))
            return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))
        return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3)))

    ours = net(lambda x, k: conv_general_dilated(x, k, (1, 1), padding,
                                                 dimension_numbers=NHWC),
               kernels._max_pool_cpu)
    reference = net(_lax(padding), MAX_POOL)
    (v1, g1), (v2, g2) = ours(x, k1, k2, bias), reference(x, k1, k2, bias)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_conv_equals_lax_on_constant_and_zero_images():
    """Every backward path of im2col on inputs where every patch is the same."""
    for x in (jnp.zeros((2, 6, 6, 3)), jnp.full((2, 6, 6, 3), 2.5)):
        k = jax.random.normal(jax.random.key(7), (3, 3, 3, 5))
        for padding in ("SAME", "VALID"):
            ours = lambda x, k: conv_general_dilated(x, k, (1, 1), padding,  # noqa: E731
                                                     dimension_numbers=NHWC)
            loss = lambda f: lambda x, k: jnp.sum(jnp.tanh(f(x, k)))  # noqa: E731
            np.testing.assert_allclose(ours(x, k), _lax(padding)(x, k), rtol=1e-5, atol=1e-5)
            for a, b in zip(jax.grad(loss(ours), (0, 1))(x, k),
                            jax.grad(loss(_lax(padding)), (0, 1))(x, k)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
