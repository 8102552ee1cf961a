"""On-device augmentation: what each transform does to real pixels, per image."""

from __future__ import annotations

import jax
import numpy as np

from fmnist_jax.augment import Augment, random_crop, random_erasing, random_flip


def _images(n=64):
    return jax.random.uniform(jax.random.key(0), (n, 28, 28, 1), minval=1.0, maxval=255.0)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = _images()
    out = np.asarray(random_crop(x, jax.random.key(1), 3))
    padded = np.pad(np.asarray(x), ((0, 0), (3, 3), (3, 3), (0, 0)))
    shifts = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(7) for dx in range(7)
                 if np.array_equal(out[i], padded[i, dy:dy + 28, dx:dx + 28])]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 20  # offsets drawn per image, 49 possible


def test_random_flip_mirrors_about_half():
    x = _images(200)
    out = np.asarray(random_flip(x, jax.random.key(2)))
    flipped = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 70 < sum(flipped) < 130


def test_random_erasing_blacks_out_one_rectangle():
    x = _images(400)  # no black pixels to start with
    out = np.asarray(random_erasing(x, jax.random.key(3), 0.5))[..., 0]
    erased = 0
    for image in out:
        zero = image == 0
        if not zero.any():
            continue
        erased += 1
        rows, cols = np.nonzero(zero.any(1))[0], np.nonzero(zero.any(0))[0]
        box = zero[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.all() and zero.sum() == box.size  # one filled rectangle
        assert 0.01 * 784 <= box.size <= 0.27 * 784  # 2% to 25% of the area, rounded
    assert 160 < erased < 240


def test_augment_composes_and_is_reproducible():
    x = _images(8)
    aug = Augment(crop=2, flip=True, erasing=1.0)
    a, b = aug(x, jax.random.key(4)), jax.jit(aug)(x, jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert not np.array_equal(a, aug(x, jax.random.key(5)))
    assert not Augment() and Augment(flip=True)
