"""Data augmentation on the device, inside the jitted train step: random crop, horizontal
flip and random erasing, each drawn per image from the step's key; and :class:`Mix`,
MixUp and CutMix, which mix pairs of images and weigh both labels in the loss.

Images come in as float pixels ``(N, 28, 28, 1)`` (0 to 255, before standardisation), so
padding and erasing use black (0), the background of Fashion-MNIST. All three are plain ``jax``
ops (gathers and selects), so they cost a few percent of a CNN step on CPU and nothing
measurable on an accelerator.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Augment:
    """What to apply: ``crop`` pixels of zero padding then a random 28x28 crop (0: none),
    a horizontal ``flip`` with probability 1/2, and random ``erasing`` with that
    probability: a rectangle of 2% to 25% of the image with aspect ratio 0.3 to 3.3, set
    to black (Zhong et al., 2017, draw up to 40% and redraw a rectangle that does not fit;
    here it is at most 25% and clipped to the image)."""

    crop: int = 0
    flip: bool = False
    erasing: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.crop or self.flip or self.erasing)

    def __call__(self, images: jax.Array, key: jax.Array) -> jax.Array:
        # Erasing comes before the flip: the same distribution of images (the rectangle's
        # position is symmetric), but XLA:CPU took over 5 minutes to compile a training
        # step that flips and then erases, against 15 s this way round.
        crop_key, flip_key, erase_key = jax.random.split(key, 3)
        if self.crop:
            images = random_crop(images, crop_key, self.crop)
        if self.erasing:
            images = random_erasing(images, erase_key, self.erasing)
        if self.flip:
            images = random_flip(images, flip_key)
        return images


def random_crop(images: jax.Array, key: jax.Array, pad: int) -> jax.Array:
    """Zero-pads by ``pad`` and cuts a random window of the original size from each image."""
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)

    def cut(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                     (h, w, image.shape[-1]))

    return jax.vmap(cut)(padded, offsets)


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def random_erasing(images: jax.Array, key: jax.Array, probability: float,
                   area=(0.02, 0.25), aspect=(0.3, 3.3)) -> jax.Array:
    """Blacks out one random rectangle in each image with ``probability``."""
    n, h, w, _ = images.shape
    k_apply, k_area, k_aspect, k_y, k_x = jax.random.split(key, 5)
    target = jax.random.uniform(k_area, (n,), minval=area[0], maxval=area[1]) * h * w
    log_ratio = jax.random.uniform(k_aspect, (n,), minval=jnp.log(aspect[0]),
                                   maxval=jnp.log(aspect[1]))
    ratio = jnp.exp(log_ratio)
    eh = jnp.clip(jnp.round(jnp.sqrt(target * ratio)), 1, h).astype(jnp.int32)
    ew = jnp.clip(jnp.round(jnp.sqrt(target / ratio)), 1, w).astype(jnp.int32)
    y0 = jnp.floor(jax.random.uniform(k_y, (n,)) * (h - eh + 1)).astype(jnp.int32)
    x0 = jnp.floor(jax.random.uniform(k_x, (n,)) * (w - ew + 1)).astype(jnp.int32)
    apply = jax.random.bernoulli(k_apply, probability, (n,))
    erase = _rectangles(h, w, y0, x0, eh, ew) & apply[:, None, None]
    return jnp.where(erase[..., None], 0.0, images)


def _rectangles(h: int, w: int, top: jax.Array, left: jax.Array, height: jax.Array,
                width: jax.Array) -> jax.Array:
    """``(n, h, w)`` masks, each of one rectangle of ``height`` x ``width`` pixels from
    ``(top, left)`` (per image), the parts outside the image left out."""
    rows, cols = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])  # (n, h)
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])  # (n, w)
    return in_rows[:, :, None] & in_cols[:, None, :]


@dataclasses.dataclass(frozen=True)
class Mix:
    """Mixing pairs of a batch's images: MixUp (Zhang et al., 2018) blends two whole images
    with weight ``lam ~ Beta(mixup, mixup)``; CutMix (Yun et al., 2019) pastes a rectangle
    of the other image covering ``1 - lam ~ Beta(cutmix, cutmix)`` of the area (centred on
    a random pixel, clipped to the image), and ``lam`` becomes the share of pixels kept.
    Each image is mixed with probability ``prob``, with the image at its place in a random
    permutation of the batch; with both on, each mixed image gets one of the two (1/2
    each). The train step's loss is ``lam * loss(label) + (1 - lam) * loss(partner's
    label)`` (:func:`fmnist_jax.steps.mixed_loss`). A ``mixup`` or ``cutmix`` of 0 turns
    that method off."""

    mixup: float = 0.0
    cutmix: float = 0.0
    prob: float = 1.0

    def __bool__(self) -> bool:
        return bool(self.mixup or self.cutmix) and self.prob > 0

    def __call__(self, images: jax.Array, key: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(images, partner, lam)``: the mixed images, the index in the batch of each
        one's partner, and each one's weight of its own label (1 where not mixed)."""
        n, h, w, _ = images.shape
        k_perm, k_apply, k_which, k_mixup, k_cutmix = jax.random.split(key, 5)
        partner = jax.random.permutation(k_perm, n)
        other = images[partner]
        mixed = jax.random.bernoulli(k_apply, self.prob, (n,))
        lam = jnp.ones((n,), jnp.float32)
        out = images
        if self.mixup and self.cutmix:  # which of the two, image by image
            cut = jax.random.bernoulli(k_which, 0.5, (n,))
        else:
            cut = jnp.full((n,), bool(self.cutmix))
        if self.mixup:
            blend = mixed & ~cut
            lam_mixup = jax.random.beta(k_mixup, self.mixup, self.mixup, (n,))
            lam = jnp.where(blend, lam_mixup, lam)
            weight = lam[:, None, None, None].astype(images.dtype)
            out = jnp.where(blend[:, None, None, None],
                            weight * images + (1 - weight) * other, out)
        if self.cutmix:
            box = _cutmix_boxes(k_cutmix, n, h, w, self.cutmix) & (mixed & cut)[:, None, None]
            lam = jnp.where(mixed & cut, 1 - box.sum((1, 2)) / (h * w), lam)
            out = jnp.where(box[..., None], other, out)
        return out, partner, lam


def _cutmix_boxes(key: jax.Array, n: int, h: int, w: int, alpha: float) -> jax.Array:
    """``(n, h, w)`` masks of one rectangle each: sides ``sqrt(1 - lam)`` of the image's,
    ``lam ~ Beta(alpha, alpha)``, centred on a random pixel, clipped to the image."""
    k_lam, k_y, k_x = jax.random.split(key, 3)
    side = jnp.sqrt(1 - jax.random.beta(k_lam, alpha, alpha, (n,)))
    bh, bw = jnp.round(side * h).astype(jnp.int32), jnp.round(side * w).astype(jnp.int32)
    cy, cx = jax.random.randint(k_y, (n,), 0, h), jax.random.randint(k_x, (n,), 0, w)
    return _rectangles(h, w, cy - bh // 2, cx - bw // 2, bh, bw)
