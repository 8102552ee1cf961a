"""On-device augmentation: what each transform does to real pixels, per image."""

from __future__ import annotations

import jax
import numpy as np

from fmnist_jax.augment import Augment, Mix, random_crop, random_erasing, random_flip


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


def _labelled_images(n):
    """Image i holds the value i + 1 in every pixel: each pixel names its image."""
    return jax.numpy.broadcast_to(jax.numpy.arange(1.0, n + 1)[:, None, None, None],
                                  (n, 28, 28, 1))


def test_cutmix_pastes_one_rectangle_of_the_partner_and_lam_counts_its_pixels():
    n = 400
    out, partner, lam = Mix(cutmix=1.0)(_labelled_images(n), jax.random.key(6))
    out, partner, lam = np.asarray(out)[..., 0], np.asarray(partner), np.asarray(lam)
    assert sorted(partner) == list(range(n))  # a permutation of the batch
    sizes = []
    for i in range(n):
        own, pasted = out[i] == i + 1, out[i] == partner[i] + 1
        if partner[i] == i:
            continue
        assert (own | pasted).all()
        assert abs(lam[i] - own.sum() / 784) < 1e-6  # the share of its own pixels
        if pasted.any():
            rows, cols = np.nonzero(pasted.any(1))[0], np.nonzero(pasted.any(0))[0]
            assert pasted[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # a rectangle
        sizes.append(1 - lam[i])
    # Beta(1, 1) areas, less what falls outside the image: a mean a little under 1/2.
    assert 0.25 < np.mean(sizes) < 0.5 and min(sizes) < 0.05 and max(sizes) > 0.8


def test_mixup_blends_whole_images_with_lam():
    n = 200
    x = _labelled_images(n)
    out, partner, lam = Mix(mixup=0.4)(x, jax.random.key(7))
    expect = lam * (np.arange(n) + 1) + (1 - lam) * (np.asarray(partner) + 1)
    np.testing.assert_allclose(np.asarray(out)[:, 5, 9, 0], expect, rtol=1e-6)
    assert np.ptp(np.asarray(out), axis=(1, 2, 3)).max() == 0  # whole images, no patches
    assert 0.35 < float(np.mean(lam)) < 0.65 and float(np.min(lam)) < 0.05


def test_mix_prob_and_both_methods():
    n = 1000
    x = _labelled_images(n)
    _, partner, lam = Mix(cutmix=1.0, prob=0.3)(x, jax.random.key(8))
    mixed = np.asarray(lam) < 1
    assert 0.24 < mixed.mean() < 0.33  # 0.3, less the boxes drawn empty
    out, partner, lam = Mix(mixup=1.0, cutmix=1.0)(x, jax.random.key(9))
    out = np.asarray(out)[..., 0]
    flat = np.ptp(out, axis=(1, 2)) == 0  # a blend (or an image with itself)
    assert 400 < flat.sum() < 600  # half of them each
    jitted = jax.jit(Mix(mixup=1.0, cutmix=1.0))(x, jax.random.key(9))
    np.testing.assert_allclose(jitted[0][..., 0], out, rtol=1e-6)  # XLA may fuse the blend
    assert not Mix() and not Mix(cutmix=1.0, prob=0.0) and Mix(mixup=0.2)
