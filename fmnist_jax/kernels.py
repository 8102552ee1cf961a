"""Convolution and pooling: XLA's own kernels on GPU and TPU, faster formulations on a CPU.

- :func:`conv_general_dilated` is a drop-in for ``jax.lax.conv_general_dilated``, the
  pluggable kernel of ``nnx.Conv`` (and Linen's ``nn.Conv``): our models use it, and
  :func:`use_fast_convolutions` puts it into a user's ``nnx.Conv`` layers. For a stride-1,
  undilated, ungrouped 2-D NHWC convolution it computes, on XLA:CPU, the patches (shifted
  slices, stacked) and one matmul with a custom gradient (:func:`im2col_conv`);
  everywhere else, and for any other convolution, it is ``lax.conv_general_dilated``
  itself.
- :func:`max_pool_2x2` and :func:`avg_pool_2x2`: on a CPU a reshape and a max (with a custom
  gradient that goes to the element XLA's select-and-scatter picks, ties included) or a
  mean; elsewhere ``lax.reduce_window`` (``nnx.max_pool``).

The choice is made when the program is lowered (``jax.lax.platform_dependent``), not when
the model is built: one exported program carries both, each platform runs its own, and the
parameters keep Flax's names and layout. Both compute the same values and gradients within
float rounding (``tests/test_kernels.py``, ``tests/test_models.py``); on XLA:CPU ours are
several times faster than select-and-scatter and autodiff of ``lax.conv`` (figures in
experiments/README.md). On a GPU or TPU the patches would hold nine times the
activations, and XLA's convolutions are what the hardware is built for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

NHWC = ("NHWC", "HWIO", "NHWC")


# ------------------------------------------------------------------------- convolution

def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kwargs):
    """``lax.conv_general_dilated``, computed by :func:`im2col_conv` on a CPU when the
    convolution is one it covers (stride 1, no dilation, no groups, 2-D, NHWC/HWIO)."""
    native = functools.partial(
        jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
    pads = _im2col_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, batch_group_count, precision,
                        preferred_element_type, kwargs)
    if pads is None:
        return native(lhs, rhs)
    return jax.lax.platform_dependent(
        lhs, rhs, cpu=lambda x, k: im2col_conv(x, k, pads), default=native)


def _im2col_pads(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                 groups, batch_groups, precision, preferred, extra):
    """The explicit ((top, bottom), (left, right)) padding when :func:`im2col_conv` computes
    this convolution, else None."""
    ones = lambda v: v is None or all(d == 1 for d in v)  # noqa: E731
    if (lhs.ndim != 4 or not ones(strides) or not ones(lhs_dilation)
            or not ones(rhs_dilation) or groups != 1 or batch_groups != 1
            or precision is not None or any(v is not None for v in extra.values())
            or (preferred is not None and jnp.dtype(preferred) != lhs.dtype)
            or lhs.dtype != rhs.dtype):
        return None
    canonical = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    given = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers or NHWC)
    if given != canonical:
        return None
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    else:
        pads = tuple(tuple(p) for p in padding)
    if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
        return None
    return tuple((int(lo), int(hi)) for lo, hi in pads)


# Patches above this size are not kept for the backward pass: the input (kh*kw times
# smaller) is, and both passes run over slices of the batch of about _CHUNK_BYTES of
# patches each, so the patches never exist whole (which about halves the ResNet's
# temporaries). The seed CNN's conv2 (85 MB) stays below the limit: recomputing its
# patches would add their cost to its step again. Figures in experiments/README.md.
_KEEP_PATCHES_BYTES = 96 * 2**20
_CHUNK_BYTES = 8 * 2**20
# Kept patches above this size (more than a server CPU's last-level cache; the seed CNN's
# conv2) are built once, and their backward pass is the one for large patches of
# :func:`_grad_kernel` (two halves) and :func:`_grad_input` (slices of the batch).
_LARGE_PATCHES_BYTES = 32 * 2**20


def im2col_conv(x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
    """Stride-1 NHWC convolution with an HWIO kernel and explicit ``pads``, as patches
    (:func:`_patches`) and one matmul; its gradient is one matmul for the kernel, and for
    the input one matmul and the slices added back (col2im). Forward-mode differentiation
    (``jax.jvp``) is not defined."""
    return _im2col(x, kernel, pads, _chunk(x, kernel, pads))


def _patch_bytes(x: jax.Array, kernel: jax.Array, pads) -> int:
    """The bytes of one image's patches (and of their gradient)."""
    _, h, w, _ = x.shape
    kh, kw, cin, _ = kernel.shape
    return ((h + sum(pads[0]) - kh + 1) * (w + sum(pads[1]) - kw + 1) * kh * kw * cin
            * jnp.dtype(x.dtype).itemsize)


def _chunk(x: jax.Array, kernel: jax.Array, pads) -> int:
    """0 (keep the patches) or the images per slice of the batch (recompute them)."""
    per_image = _patch_bytes(x, kernel, pads)
    if x.shape[0] * per_image <= _KEEP_PATCHES_BYTES:
        return 0
    return _images_per_slice(x.shape[0], per_image)


def _images_per_slice(n: int, per_image: int) -> int:
    """The most images, a divisor of ``n``, whose patches fit in ``_CHUNK_BYTES`` (at
    least 1)."""
    return max(c for c in range(1, n + 1) if n % c == 0 and
               (c == 1 or c * per_image <= _CHUNK_BYTES))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _im2col(x, kernel, pads, chunk):
    return _im2col_primal(x, kernel, pads, chunk)


def _im2col_primal(x, kernel, pads, chunk):
    kh, kw = kernel.shape[:2]
    matrix = kernel.reshape(-1, kernel.shape[-1])
    if not chunk:
        return _matmul(_patches(x, kh, kw, pads), matrix)
    y = jax.lax.map(lambda xs: _matmul(_patches(xs, kh, kw, pads), matrix),
                    _slices(x, chunk))
    return y.reshape(x.shape[0], *y.shape[2:])


def _patches(x: jax.Array, kh: int, kw: int, pads) -> jax.Array:
    """(N, Ho, Wo, kh*kw*C) patches in the kernel's row-major order (di, dj, c).

    The kh*kw shifted slices of the padded input are stacked in two levels, the kw slices of
    each kernel row, then the kh rows, on axes in front of the channels; the reshape to
    (.., kh*kw*C) is free. XLA:CPU fuses a concatenate of at most 8 operands along a major
    axis with its padding and slices (and the activation before it) into one loop that
    writes the patches once; a concatenate of the 9 slices along the channels (the
    patches' own layout), which it does not fuse, wrote each slice first and then copied
    it: the stacks are faster and use less memory, with the same patches bit for bit
    (figures in experiments/README.md). A kernel wider or taller than 8 gets unfused
    stacks, still correct.
    """
    if any(p for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    n, height, width, c = x.shape
    ho, wo = height - kh + 1, width - kw + 1
    rows = [jnp.stack([x[:, i:i + ho, j:j + wo, :] for j in range(kw)], axis=3)
            for i in range(kh)]  # each (N, Ho, Wo, kw, C)
    return jnp.stack(rows, axis=3).reshape(n, ho, wo, kh * kw * c)


def _dot(a: jax.Array, b: jax.Array, dimension_numbers, dtype=None) -> jax.Array:
    """``lax.dot_general`` summed in float32 at least (:func:`_sum_dtype`), returned in
    ``dtype`` (by default the operands'). For bfloat16 operands XLA:CPU then runs its
    bfloat16 matmul, faster than float32's on a CPU with AVX512_BF16, where a bfloat16
    result took a path slower than float32's (figures in experiments/README.md); for
    float32 or float64 operands it is the plain matmul."""
    return jax.lax.dot_general(a, b, dimension_numbers,
                               preferred_element_type=_sum_dtype(a)).astype(dtype or a.dtype)


def _sum_dtype(a: jax.Array):
    """float32 for bfloat16, float16 and float32 operands; float64 for float64 ones."""
    return jnp.promote_types(a.dtype, jnp.float32)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` (the last axis of ``a`` with the first of ``b``), through :func:`_dot`."""
    return _dot(a, b, (((a.ndim - 1,), (0,)), ((), ())))


def _slices(a: jax.Array, chunk: int) -> jax.Array:
    return a.reshape(a.shape[0] // chunk, chunk, *a.shape[1:])


def _large(patches: jax.Array) -> bool:
    return patches.size * patches.dtype.itemsize > _LARGE_PATCHES_BYTES


def _im2col_fwd(x, kernel, pads, chunk):
    if chunk:
        return _im2col_primal(x, kernel, pads, chunk), (x, kernel)
    patches = _patches(x, *kernel.shape[:2], pads)
    if _large(patches):  # built once: XLA would fuse a second copy into the halves of
        patches = jax.lax.optimization_barrier(patches)  # _grad_kernel
    return _matmul(patches, kernel.reshape(-1, kernel.shape[-1])), (patches, kernel)


def _im2col_bwd(pads, chunk, residuals, grad):
    saved, kernel = residuals
    kh, kw = kernel.shape[:2]
    if not chunk:
        large = _large(saved)
        images = (_images_per_slice(grad.shape[0], saved[0].size * saved.dtype.itemsize)
                  if large else 0)
        return (_grad_input(grad, kernel, pads, images),
                _grad_kernel(saved, grad, kernel, halves=large))

    def body(grad_kernel, xs_gs):  # the kernel's gradient summed over the slices
        xs, gs = xs_gs
        patches = _patches(xs, kh, kw, pads)
        return (grad_kernel + _grad_kernel(patches, gs, kernel, halves=False),
                _grad_input(gs, kernel, pads, 0))

    grad_kernel, grad_x = jax.lax.scan(body, jnp.zeros_like(kernel),
                                       (_slices(saved, chunk), _slices(grad, chunk)))
    return grad_x.reshape(saved.shape), grad_kernel


def _grad_kernel(patches: jax.Array, grad: jax.Array, kernel: jax.Array, *,
                 halves: bool) -> jax.Array:
    """The kernel's gradient, patches^T @ grad summed over all N*Ho*Wo positions. With
    ``halves``, two matmuls (grad^T @ patches) over the two halves of the positions, then
    summed: XLA:CPU runs them side by side, where it shares out one matmul with a long sum
    and a small result poorly. Faster for large patches, slower for small ones, hence only
    for large patches (figures in experiments/README.md).

    bfloat16 patches are transposed first, a copy that the barrier keeps XLA from folding
    into the matmul: XLA:CPU's bfloat16 matmul is fast only with the summed axis the left
    operand's last, and several times slower on the patches as they lie."""
    cout = grad.shape[-1]
    p, g = patches.reshape(-1, patches.shape[-1]), grad.reshape(-1, cout)
    if p.dtype == jnp.bfloat16:
        n, k = patches.shape[0], patches.shape[-1]
        p_t = jax.lax.optimization_barrier(patches.reshape(n, -1, k).transpose(2, 0, 1))
        return _matmul(p_t.reshape(k, -1), g).reshape(kernel.shape)
    if not halves or p.shape[0] % 2:
        return jax.lax.dot_general(p, g, (((0,), (0,)), ((), ()))).reshape(kernel.shape)
    grad_t = jax.lax.dot_general(g.reshape(2, -1, cout), p.reshape(2, -1, p.shape[1]),
                                 (((1,), (1,)), ((0,), (0,)))).sum(axis=0)
    return grad_t.T.reshape(kernel.shape)


def _grad_input(grad: jax.Array, kernel: jax.Array, pads, images: int) -> jax.Array:
    """The input's gradient: grad @ kernel^T, the patches' gradient, added back by
    :func:`_col2im`; with ``images``, one slice of that many images at a time, so that
    the patches' gradient (kh*kw times the input) is added back while it is in the cache,
    faster for large patches (figures in experiments/README.md). The patches' gradient
    and its sum are float32 at least (XLA:CPU adds bfloat16 slices several
    times slower than float32 ones); the result has the operands' dtype."""
    kh, kw, cin, cout = kernel.shape

    def one(g):
        grad_patches = _dot(g, kernel.reshape(-1, cout), (((3,), (1,)), ((), ())),
                            _sum_dtype(g))
        return _col2im(grad_patches, kh, kw, cin, pads).astype(g.dtype)

    if not images:
        return one(grad)
    grad_x = jax.lax.map(one, _slices(grad, images))
    return grad_x.reshape(grad.shape[0], *grad_x.shape[2:])


def _col2im(grad_patches: jax.Array, kh: int, kw: int, cin: int, pads) -> jax.Array:
    """The transpose of :func:`_patches`: each window position's slice of the patches'
    gradient added back where it was read from, then the padding cropped. The sum runs
    along each row of the window first, then over rows."""
    _, ho, wo, _ = grad_patches.shape
    height, width = ho + kh - 1, wo + kw - 1
    total = None
    for i in range(kh):
        row = None
        for j in range(kw):
            part = grad_patches[..., (i * kw + j) * cin:(i * kw + j + 1) * cin]
            part = jnp.pad(part, ((0, 0), (0, 0), (j, kw - 1 - j), (0, 0)))
            row = part if row is None else row + part
        row = jnp.pad(row, ((0, 0), (i, kh - 1 - i), (0, 0), (0, 0)))
        total = row if total is None else total + row
    (top, bottom), (left, right) = pads
    return total[:, top:height - bottom, left:width - right, :]


_im2col.defvjp(_im2col_fwd, _im2col_bwd)


def use_fast_convolutions(model: nnx.Module) -> int:
    """Makes every ``nnx.Conv`` of ``model`` that uses ``lax.conv_general_dilated`` (the
    default) use :func:`conv_general_dilated` instead; returns how many. Same parameters,
    same results within float rounding; on XLA:CPU several times faster to train."""
    changed = 0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv) and \
                module.conv_general_dilated is jax.lax.conv_general_dilated:
            module.conv_general_dilated = conv_general_dilated
            changed += 1
    return changed


# -------------------------------------------------------------------- compiler options

def cpu_compiler_options() -> dict[str, str]:
    """XLA options for our CPU programs, passed to ``jax.jit`` (per program, never through
    XLA_FLAGS): ``jax.checkpoint``'s optimization barriers are kept (the
    ``cse_barrier_expander`` pass is off). XLA:CPU removes them early by default, and
    common-subexpression elimination then merges the recomputed forward pass with the first
    one, so that rematerialisation (:func:`remat_on_cpu`) saves no memory (figures in
    experiments/README.md). A program without barriers compiles as before."""
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_disable_hlo_passes": "cse_barrier_expander"}


# ---------------------------------------------------------------------- rematerialisation

def remat_on_cpu(module: nnx.Module, x: jax.Array) -> jax.Array:
    """``module(x)``, whose activations a CPU recomputes in the backward pass from ``x``
    (``jax.checkpoint``, with :func:`cpu_compiler_options`) instead of keeping them; on a
    GPU or TPU, where memory is not what limits a small model, it keeps them. The module's
    state (batch statistics, RNG counts) is updated as by ``module(x)``."""
    graphdef, state = nnx.split(module)

    def run(state, x):
        module = nnx.merge(graphdef, state)
        return module(x), nnx.state(module)

    y, state = jax.lax.platform_dependent(state, x, cpu=jax.checkpoint(run), default=run)
    nnx.update(module, state)
    return y


# ----------------------------------------------------------------------------- pooling

def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 (odd sizes are cropped, as ``VALID`` pooling)."""
    return jax.lax.platform_dependent(
        x, cpu=_max_pool_cpu,
        default=lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"))


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2 (odd sizes are cropped)."""
    return jax.lax.platform_dependent(
        x, cpu=_avg_pool_cpu,
        default=lambda x: nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID"))


def _avg_pool_cpu(x: jax.Array) -> jax.Array:
    """A reshape and a mean (autodiff's gradient: a quarter to each element)."""
    return _windows_2x2(x).mean(axis=(2, 4))


def _windows_2x2(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H/2, 2, W/2, 2, C), odd sizes cropped: pool over axes (2, 4)."""
    n, h, w, c = x.shape
    return x[:, : h - h % 2, : w - w % 2, :].reshape(n, h // 2, 2, w // 2, 2, c)


def _max_pool_cpu(x: jax.Array) -> jax.Array:
    """A reshape and a max, with a custom gradient that is XLA's: the whole output gradient
    goes to the *first* maximum of each window in window order (top-left, top-right,
    bottom-left, bottom-right), the element ``reduce_window``'s select-and-scatter picks,
    also where several elements tie (a flat background gives equal convolution outputs in
    a third of the windows). The forward pass keeps that element's position, one int8 per
    output, instead of the input."""
    _, h, w, _ = x.shape
    return _max_pool(x[:, : h - h % 2, : w - w % 2, :])


@jax.custom_vjp
def _max_pool(x: jax.Array) -> jax.Array:
    return _windows_2x2(x).max(axis=(2, 4))


def _max_and_first_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each 2x2 window's maximum, and the position (0..3, row-major) that XLA's
    select-and-scatter selects: it walks the window in order and moves on from the element
    it holds only when that is not ``>=`` the next one (the first of tied maxima; NaN
    included, as XLA does)."""
    w = _windows_2x2(x)
    held, position = w[:, :, 0, :, 0], jnp.zeros(w.shape[:2] + w.shape[3:4] + w.shape[5:],
                                                  jnp.int8)
    for i, (r, c) in enumerate(((0, 1), (1, 0), (1, 1)), start=1):
        nxt = w[:, :, r, :, c]
        keep = held >= nxt
        held, position = jnp.where(keep, held, nxt), jnp.where(keep, position, jnp.int8(i))
    return w.max(axis=(2, 4)), position


def _max_pool_fwd(x):
    return _max_and_first_argmax(x)


def _max_pool_bwd(position, grad):
    n, h, w, c = position.shape
    window = jnp.arange(4, dtype=jnp.int8).reshape(2, 1, 2, 1)  # (row, 1, column, 1)
    spread = jnp.where(position[:, :, None, :, None] == window, grad[:, :, None, :, None],
                       jnp.zeros((), grad.dtype))
    return (spread.reshape(n, 2 * h, 2 * w, c),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
