"""Flax NNX models: the seed MLP, the seeds' classic CNN, our CNN and a small ResNet.

Every model follows Flax's conventions, as a model of your own does: it maps float images
``(N, H, W, C)`` (standardised; Fashion-MNIST's ``(N, 28, 28, 1)`` by default) to logits
``(N, K)`` (``num_classes``, 10 by default) when called as ``model(x)``;
``model.train()`` and ``model.eval()`` switch dropout and batch-norm statistics; dropout
draws its keys from the ``nnx.Rngs`` the model was built with (its ``dropout`` stream,
else ``default``), whose state is part of the model's state.

Like Flax's layers, every model takes ``dtype``, the dtype of its computation (``None``:
that of its inputs and parameters, float32; ``jnp.bfloat16``: every convolution and matmul
on bfloat16 operands, batch norm's statistics kept in float32), and ``param_dtype``, the
dtype of its parameters (float32).

Convolutions are ``nnx.Conv`` with :func:`fmnist_jax.kernels.conv_general_dilated` as their
kernel, and pooling is :func:`fmnist_jax.kernels.max_pool_2x2`: XLA's own on GPU and TPU,
several times faster formulations on XLA:CPU (see :mod:`fmnist_jax.kernels`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmnist_jax.data import IMAGE_SHAPE, NUM_CLASSES  # Fashion-MNIST's: the defaults
from fmnist_jax.kernels import (avg_pool_2x2, conv_general_dilated, max_pool_2x2,
                                remat_on_cpu)



def Conv(in_features: int, out_features: int, kernel_size: int = 3, padding: str = "SAME",
         *, rngs: nnx.Rngs, **dtypes) -> nnx.Conv:
    """``nnx.Conv`` (square kernel, stride 1) with the per-platform kernel."""
    return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), padding=padding,
                    conv_general_dilated=conv_general_dilated, rngs=rngs, **dtypes)


def _dtypes(dtype, param_dtype) -> dict:
    """The ``dtype`` and ``param_dtype`` arguments of Flax's layers."""
    return {"dtype": dtype, "param_dtype": param_dtype}


class MLP(nnx.Module):
    """The seed MLP: Flatten, [Dense, ReLU, Dropout] per hidden layer, Dense 10.

    With the default ``hidden=(300, 100)`` it has exactly 266,610 parameters.
    """

    def __init__(self, hidden: Sequence[int] = (300, 100), dropout: float = 0.2, *,
                 image_shape: Sequence[int] = IMAGE_SHAPE, num_classes: int = NUM_CLASSES,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        t = _dtypes(dtype, param_dtype)
        sizes = (math.prod(image_shape), *hidden)
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs, **t) for a, b in zip(sizes[:-1], sizes[1:])])
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs, **t)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = self.dropout(nnx.relu(layer(x)))
        return self.head(x)


class CNNSeed(nnx.Module):
    """The seeds' classic Keras CNN, for side-by-side comparison (1,199,882 parameters).

    Conv 32 3x3 VALID, ReLU, Conv 64 3x3 VALID, ReLU, MaxPool 2, Dropout 0.25, Dense 128,
    ReLU, Dropout 0.5, Dense 10.
    """

    def __init__(self, *, image_shape: Sequence[int] = IMAGE_SHAPE,
                 num_classes: int = NUM_CLASSES, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        t = _dtypes(dtype, param_dtype)
        height, width, channels = image_shape
        self.conv1 = Conv(channels, 32, 3, "VALID", rngs=rngs, **t)
        self.conv2 = Conv(32, 64, 3, "VALID", rngs=rngs, **t)
        self.drop_conv = nnx.Dropout(0.25, rngs=rngs)
        self.dense = nnx.Linear((height - 4) // 2 * ((width - 4) // 2) * 64, 128, rngs=rngs,
                                **t)
        self.drop_dense = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(128, num_classes, rngs=rngs, **t)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = max_pool_2x2(nnx.relu(self.conv2(x)))
        x = self.drop_conv(x)
        x = nnx.relu(self.dense(x.reshape(x.shape[0], -1)))
        return self.head(self.drop_dense(x))


class CNN(nnx.Module):
    """Our CNN, designed for accuracy per second of CPU.

    Each entry of ``features`` is a block: Conv 3x3 SAME, MaxPool 2, [BatchNorm], ReLU, so
    every later convolution runs at a quarter of the previous resolution (28, 14, 7). Then
    Dropout, Dense ``dense``, ReLU, Dropout, Dense 10. Pooling comes straight after the
    convolution, so batch norm and ReLU run on a quarter of the values: a faster training
    step than with pooling last, and no loss of accuracy (figures in experiments/README.md).
    """

    def __init__(self, features: Sequence[int] = (32, 64, 128), dense: int = 256,
                 dropout: float = 0.1, batch_norm: bool = True, *,
                 image_shape: Sequence[int] = IMAGE_SHAPE, num_classes: int = NUM_CLASSES,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        t = _dtypes(dtype, param_dtype)
        height, width, channels = image_shape
        channels = (channels, *features)
        self.convs = nnx.List(
            [Conv(a, b, 3, "SAME", rngs=rngs, **t)
             for a, b in zip(channels[:-1], channels[1:])])
        self.norms = nnx.List(
            [nnx.BatchNorm(b, momentum=0.9, rngs=rngs, **t) for b in features] if batch_norm
            else [])
        for _ in features:
            height, width = height // 2, width // 2
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.dense = nnx.Linear(height * width * features[-1], dense, rngs=rngs, **t)
        self.head = nnx.Linear(dense, num_classes, rngs=rngs, **t)

    def __call__(self, x):
        for i, conv in enumerate(self.convs):
            x = max_pool_2x2(conv(x))
            if self.norms:
                x = self.norms[i](x)
            x = nnx.relu(x)
        x = self.dropout(x.reshape(x.shape[0], -1))
        x = self.dropout(nnx.relu(self.dense(x)))
        return self.head(x)


class ResidualBlock(nnx.Module):
    """Pre-activation residual block: BN, ReLU, [2x2 average pool], Conv 3x3, BN, ReLU,
    Dropout, Conv 3x3, plus the input (average-pooled and projected by a 1x1 convolution
    when the resolution or the width changes). Downsampling pools *before* the
    convolution, so no stride-2 convolution computes outputs it throws away."""

    def __init__(self, in_features: int, out_features: int, downsample: bool,
                 dropout: float, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        t = _dtypes(dtype, param_dtype)
        self.downsample = downsample
        self.norm1 = nnx.BatchNorm(in_features, momentum=0.9, rngs=rngs, **t)
        self.conv1 = Conv(in_features, out_features, 3, "SAME", rngs=rngs, **t)
        self.norm2 = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs, **t)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.conv2 = Conv(out_features, out_features, 3, "SAME", rngs=rngs, **t)
        self.project = (nnx.Linear(in_features, out_features, use_bias=False, rngs=rngs, **t)
                        if in_features != out_features else None)

    def __call__(self, x):
        y = nnx.relu(self.norm1(x))
        if self.downsample:
            x, y = avg_pool_2x2(x), avg_pool_2x2(y)
        y = self.conv1(y)
        y = nnx.relu(self.norm2(y))
        y = self.conv2(self.dropout(y))
        return y + (self.project(x) if self.project is not None else x)


class ResNet(nnx.Module):
    """A small wide pre-activation ResNet for 28x28 images (the stronger preset).

    Conv 3x3 stem with ``features[0]`` channels, then one stage per entry of ``features``
    with ``blocks`` :class:`ResidualBlock` each; every stage after the first halves the
    resolution (28, 14, 7). Then BN, ReLU, global average pooling and Dense 10. The
    default ``(64, 128, 256)`` x 2 blocks has 2,777,610 parameters.

    ``remat_on_cpu``: on a CPU, the backward pass recomputes each block's activations from
    its input (:func:`fmnist_jax.kernels.remat_on_cpu`), the same gradients (bitwise) with
    about half the temporaries and a somewhat slower step (figures in
    experiments/README.md). GPUs and TPUs keep the activations.
    """

    def __init__(self, features: Sequence[int] = (64, 128, 256), blocks: int = 2,
                 dropout: float = 0.0, remat_on_cpu: bool = True, *,
                 image_shape: Sequence[int] = IMAGE_SHAPE, num_classes: int = NUM_CLASSES,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        t = _dtypes(dtype, param_dtype)
        self.remat_on_cpu = remat_on_cpu
        self.stem = Conv(image_shape[-1], features[0], 3, "SAME", rngs=rngs, **t)
        layers, width = [], features[0]
        for stage, out in enumerate(features):
            for b in range(blocks):
                layers.append(ResidualBlock(width, out, stage > 0 and b == 0, dropout,
                                            rngs=rngs, **t))
                width = out
        self.blocks = nnx.List(layers)
        self.norm = nnx.BatchNorm(width, momentum=0.9, rngs=rngs, **t)
        self.head = nnx.Linear(width, num_classes, rngs=rngs, **t)

    def __call__(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = remat_on_cpu(block, x) if self.remat_on_cpu else block(x)
        x = nnx.relu(self.norm(x))
        return self.head(x.mean(axis=(1, 2)))


def create_model(name: str, *, rngs: nnx.Rngs, hidden: Sequence[int] = (300, 100),
                 features: Sequence[int] = (32, 64, 128), dense: int = 256,
                 dropout: float | None = None, batch_norm: bool = True,
                 blocks: int = 2, dtype=None, image_shape: Sequence[int] = IMAGE_SHAPE,
                 num_classes: int = NUM_CLASSES) -> nnx.Module:
    """Builds a named model for images ``image_shape`` ``(H, W, C)`` and ``num_classes``
    classes; ``dropout=None`` keeps the model's own default; ``dtype`` is the
    computation's (parameters stay float32)."""
    dtype = None if dtype is None else jnp.dtype(dtype)
    own = {} if dropout is None else {"dropout": dropout}  # else the class's default
    data = {"image_shape": tuple(image_shape), "num_classes": num_classes}
    if name == "mlp":
        return MLP(hidden, dtype=dtype, rngs=rngs, **own, **data)
    if name == "cnn":
        return CNN(features, dense, batch_norm=batch_norm, dtype=dtype, rngs=rngs, **own,
                   **data)
    if name == "cnn_seed":
        return CNNSeed(dtype=dtype, rngs=rngs, **data)
    if name == "resnet":
        return ResNet(features, blocks, dtype=dtype, rngs=rngs, **own, **data)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def whitening_filters(images, size: int = 3, eps: float = 5e-4) -> np.ndarray:
    """Filters ``(size, size, C, 2 * size * size * C)`` that whiten the ``size`` x ``size``
    patches of ``images`` ``(N, H, W, C)`` (normalised, as the model sees them; zeros
    beyond the edge, as a SAME convolution pads): the patches' principal directions,
    largest variance first, each scaled to unit variance (``eps`` added to every
    variance) and followed by its negation, so that a ReLU after them keeps both signs.
    airbench's first layer (arXiv 2404.00498)."""
    images = np.asarray(images, np.float64)
    height, width, channels = images.shape[1:]
    before, after = (size - 1) // 2, size // 2
    dim = size * size * channels
    total, outer, count = np.zeros(dim), np.zeros((dim, dim)), 0
    for start in range(0, len(images), 500):  # patches of 500 images at a time
        chunk = np.pad(images[start:start + 500],
                       ((0, 0), (before, after), (before, after), (0, 0)))
        # (image, y, x, i, j, channel): the order of a (size, size, C, F) kernel's rows
        patches = np.stack([np.stack([chunk[:, i:i + height, j:j + width]
                                      for j in range(size)], 3) for i in range(size)], 3)
        patches = patches.reshape(-1, dim)
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    variances, directions = np.linalg.eigh(outer / count - np.outer(mean, mean))
    order = np.argsort(variances)[::-1]
    scaled = directions[:, order] / np.sqrt(np.maximum(variances[order], 0) + eps)
    pairs = np.stack([scaled, -scaled], axis=2).reshape(dim, 2 * dim)
    return pairs.reshape(size, size, channels, 2 * dim).astype(np.float32)


def first_convolution(model: nnx.Module) -> nnx.Conv:
    """The convolution that sees the images: ``CNN``'s first, ``ResNet``'s stem."""
    if isinstance(model, CNN):
        return model.convs[0]
    if isinstance(model, ResNet):
        return model.stem
    raise TypeError(f"{type(model).__name__} is not this library's CNN or ResNet")


def whiten_first_convolution(model: nnx.Module, filters) -> None:
    """Starts the first convolution of ``model`` (:func:`first_convolution`) from
    ``filters`` (:func:`whitening_filters` of its training images): they replace its first
    filters, as many as it has (the directions of least variance are left out of a
    narrower layer); its other filters and its bias keep their values."""
    conv = first_convolution(model)
    kernel = conv.kernel[...]
    if tuple(filters.shape[:3]) != tuple(kernel.shape[:3]):
        raise ValueError(f"filters of shape {tuple(filters.shape)} do not fit the first "
                         f"convolution's kernel {tuple(kernel.shape)}")
    n = min(filters.shape[-1], kernel.shape[-1])
    conv.kernel[...] = kernel.at[..., :n].set(jnp.asarray(filters[..., :n], kernel.dtype))


MODELS: dict[str, Callable[..., nnx.Module]] = {"mlp": MLP, "cnn": CNN, "cnn_seed": CNNSeed,
                                                "resnet": ResNet}


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (batch-norm statistics are not counted)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
