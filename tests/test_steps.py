"""Losses and the pure train and eval steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fmnist_jax.models import create_model
from fmnist_jax.steps import (PIXEL_MEAN, PIXEL_STD, create_train_state, cross_entropy,
                              ema_decay_at, inference_variables, make_loss, make_steps,
                              normalize)


def test_sparse_and_categorical_losses_agree():
    logits = jax.random.normal(jax.random.key(0), (64, 10)) * 3
    labels = jax.random.randint(jax.random.key(1), (64,), 0, 10)
    sparse = cross_entropy(logits, labels, loss="sparse")
    categorical = cross_entropy(logits, labels, loss="categorical")
    np.testing.assert_allclose(sparse, categorical, rtol=1e-5, atol=1e-6)
    # And both equal -log softmax at the label.
    np.testing.assert_allclose(
        sparse, -jax.nn.log_softmax(logits)[jnp.arange(64), labels], rtol=1e-5, atol=1e-6)


def test_label_smoothing_value():
    logits = jnp.array([[2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    logp = jax.nn.log_softmax(logits)[0]
    expected = -(0.9 * logp[0] + 0.01 * logp.sum())  # (1 - a) one-hot + a / 10, a = 0.1
    for loss in ("sparse", "categorical"):
        value = cross_entropy(logits, jnp.array([0]), loss=loss, label_smoothing=0.1)
        assert float(value[0]) == pytest.approx(float(expected), rel=1e-6)


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        make_loss("hinge")


def test_normalize():
    out = normalize(jnp.array([0, 255], jnp.uint8))
    np.testing.assert_allclose(out, [-PIXEL_MEAN / PIXEL_STD, (1 - PIXEL_MEAN) / PIXEL_STD],
                               rtol=1e-6)
    # The constants themselves, written out: pixel mean 72.94 and std 90.02 (of 255).
    assert (PIXEL_MEAN * 255, PIXEL_STD * 255) == pytest.approx((72.9404, 90.0212), abs=1e-4)


def test_normalize_constants_are_the_training_sets(real_data_dir):
    from fmnist_jax.data import load_dataset

    train = normalize(load_dataset(str(real_data_dir), validation_size=0).train.images)
    assert float(train.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(train.std()) == pytest.approx(1.0, abs=1e-4)


def _setup(name="cnn", tx=None):
    model = create_model(name, rngs=nnx.Rngs(0), features=(8, 16), dense=32)
    tx = tx or optax.adam(3e-3)
    graphdef, state = create_train_state(model, tx, jax.random.key(1))
    return graphdef, state, make_steps(graphdef, tx, make_loss())


def _batch(n=32, seed=0):
    images = jax.random.randint(jax.random.key(seed), (n, 28, 28, 1), 0, 256).astype(jnp.uint8)
    return {"image": images, "label": jnp.arange(n) % 10}


def test_train_step_learns_and_updates_batch_stats():
    graphdef, state, steps = _setup()
    before_stats = jax.tree.map(np.asarray, state.model_state)
    batch = _batch()
    first = None
    for _ in range(30):
        state, metrics = steps.train_step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert int(state.step) == 30
    assert float(metrics["loss"]) < 0.5 * first
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before_stats,
                           jax.tree.map(np.asarray, state.model_state))
    assert all(jax.tree.leaves(changed))  # running mean and variance moved


def test_mixed_train_step_loss_weighs_both_labels():
    """With MixUp and CutMix on, the step's loss is, image by image, lam times the loss of
    its own label plus 1 - lam times its partner's, on the images Mix made from the
    step's key; the accuracy counts each image's label of larger weight."""
    from fmnist_jax.augment import Mix
    from fmnist_jax.steps import mixed_loss

    model = create_model("mlp", rngs=nnx.Rngs(0), hidden=(64,), dropout=0.0)
    tx, mix, loss_fn = optax.adam(3e-3), Mix(mixup=0.4, cutmix=1.0, prob=0.8), make_loss()
    graphdef, state = create_train_state(model, tx, jax.random.key(1))
    batch = _batch(64)
    key = jax.random.fold_in(state.rng, state.step)
    images, partner, lam = mix(batch["image"].astype(jnp.float32), jax.random.fold_in(key, 1))
    assert 0 < int((lam < 1).sum()) < 64 and len(set(np.asarray(partner))) == 64
    m = nnx.merge(graphdef, state.params, state.rngs, state.model_state, copy=True)
    logits = m(normalize(images))
    by_hand = jnp.mean(lam * loss_fn(logits, batch["label"])
                       + (1 - lam) * loss_fn(logits, batch["label"][partner]))
    np.testing.assert_allclose(
        jnp.mean(mixed_loss(loss_fn, logits, batch["label"], partner, lam)), by_hand)
    counted = jnp.where(lam >= 0.5, batch["label"], batch["label"][partner])
    assert bool((counted != batch["label"]).any())  # some partners outweigh
    accuracy = jnp.mean(logits.argmax(-1) == counted)
    steps = make_steps(graphdef, tx, loss_fn, mix=mix)
    _, metrics = steps.train_step(state, batch)
    np.testing.assert_allclose(metrics["loss"], by_hand, rtol=1e-5)
    assert float(metrics["accuracy"]) == float(accuracy)
    assert abs(float(by_hand) - float(jnp.mean(loss_fn(logits, batch["label"])))) > 0.01
    with pytest.raises(ValueError, match="one loss per example"):
        mixed_loss(lambda *a: loss_fn(*a).mean(), logits, batch["label"], partner, lam)


def test_train_step_donates_the_state():
    _, state, steps = _setup("mlp")
    old = state
    state, _ = steps.train_step(state, _batch())
    assert jax.tree.leaves(old.params)[0].is_deleted()


def test_dropout_keys_come_from_the_models_rng_streams():
    """Each step draws its masks from the model's own RNG streams, kept in the state: the
    same state gives the same step, bit for bit; the streams advance, so the same batch and
    parameters with the next step's streams give other masks."""
    graphdef, state, steps = _setup("mlp", optax.sgd(0.1))
    a, _ = steps.train_step(jax.tree.map(jnp.copy, state), _batch())
    again, _ = steps.train_step(jax.tree.map(jnp.copy, state), _batch())
    np.testing.assert_array_equal(jax.tree.leaves(a.params)[0], jax.tree.leaves(again.params)[0])
    counts = lambda s: [int(x) for x in jax.tree.leaves(s.rngs) if x.dtype == jnp.uint32]  # noqa
    assert all(n == m + 2 for n, m in zip(counts(a), counts(state)))  # two dropout calls
    advanced = jax.tree.map(jnp.copy, state.replace(rngs=a.rngs))
    b, _ = steps.train_step(advanced, _batch())
    assert not np.allclose(jax.tree.leaves(a.params)[0], jax.tree.leaves(b.params)[0])


def test_eval_batches_equal_single_batches_and_pad_nothing_real():
    from fmnist_jax.input_pipeline import batched, unbatched

    _, state, steps = _setup()
    variables = inference_variables(state)
    images = np.asarray(_batch(25)["image"])
    whole = np.asarray(steps.eval_step(variables, images))
    assert whole.shape == (25, 10) and whole.dtype == np.float32
    padded = batched(images, 8)  # 4 batches, the last with 7 black images
    assert padded.shape == (4, 8, 28, 28, 1) and not padded[3, 1:].any()
    logits = unbatched(steps.eval_batches(variables, padded), 25)
    np.testing.assert_allclose(logits, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(  # the same batch, alone or among others: same bits
        logits[8:16], np.asarray(steps.eval_batches(variables, padded[1:2]))[0])


def test_classification_metrics():
    from fmnist_jax.metrics import classification

    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]]))
    got = classification(logits, np.array([0, 1, 2]))
    assert got["count"] == 3 and got["accuracy"] == pytest.approx(1 / 3)
    assert got["loss"] == pytest.approx(-(np.log(0.7) + np.log(0.3) + np.log(0.1)) / 3,
                                        rel=1e-12)
    big = np.array([[1000.0, 0.0]])  # no overflow
    assert classification(big, np.array([1]))["loss"] == pytest.approx(1000.0)


def test_scan_equals_single_steps():
    _, state, steps = _setup("mlp")
    images = jax.random.randint(jax.random.key(3), (64, 28, 28, 1), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(64) % 10
    indices = jnp.arange(64).reshape(4, 16)
    one = jax.tree.map(jnp.copy, state)
    losses = []
    for idx in indices:
        one, m = steps.train_step(one, {"image": images[idx], "label": labels[idx]})
        losses.append(float(m["loss"]))
    batches = jax.tree.map(jnp.copy, state)
    scanned, metrics = steps.train_scan(state, images, labels, indices)
    np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-5)  # one per step
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(scanned.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The streamed pipeline's scan, over the same batches given whole: the same bits.
    streamed, metrics_b = steps.train_batches(batches, images[indices], labels[indices])
    np.testing.assert_array_equal(metrics_b["loss"], metrics["loss"])
    for a, b in zip(jax.tree.leaves(streamed.params), jax.tree.leaves(scanned.params)):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_keeps_float32_state():
    """The same model built with Flax's dtype=bfloat16: the same parameters (float32), a
    loss within 2%, float32 state after a step and float32 logits."""
    kwargs = dict(features=(8, 16), dense=32)
    tx = optax.adam(1e-3)
    built = [create_train_state(create_model("cnn", rngs=nnx.Rngs(0), dtype=dtype, **kwargs),
                                tx, jax.random.key(1)) for dtype in (None, jnp.bfloat16)]
    (g32, state), (g16, state16) = built
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state16.params)):
        np.testing.assert_array_equal(a, b)
    f32, bf16 = make_steps(g32, tx, make_loss()), make_steps(g16, tx, make_loss())
    batch = _batch()
    s32, m32 = f32.train_step(jax.tree.map(jnp.copy, state), batch)
    s16, m16 = bf16.train_step(jax.tree.map(jnp.copy, state), batch)
    assert float(m16["loss"]) != float(m32["loss"])  # really computed otherwise
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
    for leaf in jax.tree.leaves((s16.params, s16.model_state, s16.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    logits = bf16.eval_step(inference_variables(s16), batch["image"])
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, f32.eval_step(inference_variables(s16), batch["image"]),
                               atol=0.1)


def test_ema_decay_schedule():
    steps = jnp.array([0, 1, 90, 10_000])
    np.testing.assert_allclose(ema_decay_at(steps, 0.998), [0.1, 2 / 11, 0.91, 0.998],
                               rtol=1e-6)


def test_ema_moves_and_is_what_evaluation_uses():
    model = create_model("cnn", features=(8,), dense=16, rngs=nnx.Rngs(0))
    tx = optax.adam(1e-2)
    graphdef, state = create_train_state(model, tx, jax.random.key(1), ema=True)
    steps = make_steps(graphdef, tx, make_loss(), ema_decay=0.99)
    init = jax.tree.map(np.asarray, state.params)
    state, _ = steps.train_step(state, _batch())
    # Step 0 averages with weight min(0.99, 1/10): ema = 0.1 * init + 0.9 * new.
    for avg, old, new in zip(jax.tree.leaves(state.ema["params"]), jax.tree.leaves(init),
                             jax.tree.leaves(state.params)):
        np.testing.assert_allclose(avg, 0.1 * old + 0.9 * np.asarray(new), rtol=1e-5,
                                   atol=1e-7)
    for _ in range(5):
        state, _ = steps.train_step(state, _batch())
    images = _batch()["image"]
    variables = inference_variables(state)
    assert variables["params"] is state.ema["params"]
    assert variables["model_state"] is state.ema["model_state"]
    with_ema = np.asarray(steps.eval_step(variables, images))
    np.testing.assert_array_equal(with_ema, steps.eval_step({**state.ema, "rngs": state.rngs},
                                                            images))
    live = steps.eval_step(inference_variables(state.replace(ema=None)), images)
    assert not np.allclose(live, with_ema)


def test_flip_test_time_augmentation_averages_the_mirror_images_logits():
    _, state, steps = _setup()
    graphdef = _setup()[0]
    variables = inference_variables(state)
    images = _batch(8)["image"]
    tta = make_steps(graphdef, optax.adam(1e-3), make_loss(), tta_flip=True)
    plain = np.asarray(steps.eval_step(variables, images))
    mirrored = np.asarray(steps.eval_step(variables, images[:, :, ::-1]))
    np.testing.assert_allclose(tta.eval_step(variables, images), (plain + mirrored) / 2,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tta.eval_step(variables, images[:, :, ::-1]),
                               tta.eval_step(variables, images), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("radius", [1, 2])
def test_shift_test_time_augmentation_averages_the_translations(radius):
    """--tta_shift=N: the mean of the logits of the image moved by -N to +N pixels along
    each axis, black entering at the edge (shifted here with numpy): 9 views for 1, 25 for
    2; with --tta_flip as well, the 18 views include their mirror images."""
    graphdef, state, steps = _setup()
    variables = inference_variables(state)
    images = np.asarray(_batch(8)["image"])

    def shifted(dy, dx):
        out = np.zeros_like(images)
        out[:, max(dy, 0):28 + min(dy, 0), max(dx, 0):28 + min(dx, 0)] = \
            images[:, max(-dy, 0):28 + min(-dy, 0), max(-dx, 0):28 + min(-dx, 0)]
        return out

    offsets = range(-radius, radius + 1)
    views = [shifted(dy, dx) for dy in offsets for dx in offsets]
    centre = len(views) // 2
    assert len(views) == (2 * radius + 1) ** 2 and np.array_equal(views[centre], images)
    assert not np.array_equal(views[0], images)
    logits = [np.asarray(steps.eval_step(variables, v)) for v in views]
    shift = make_steps(graphdef, optax.adam(1e-3), make_loss(), tta_shift=radius)
    np.testing.assert_allclose(shift.eval_step(variables, images), np.mean(logits, axis=0),
                               rtol=1e-5, atol=1e-5)
    assert np.abs(np.mean(logits, axis=0) - logits[centre]).max() > 1e-3  # the shifts count
    if radius > 1:
        return
    both = make_steps(graphdef, optax.adam(1e-3), make_loss(), tta_shift=True, tta_flip=True)
    mirrored = [np.asarray(steps.eval_step(variables, v[:, :, ::-1])) for v in views]
    np.testing.assert_allclose(both.eval_step(variables, images),
                               np.mean(logits + mirrored, axis=0), rtol=1e-5, atol=1e-5)
    for platform in ("tpu", "cuda"):  # the views lower for accelerators too
        exported = jax.export.export(both.eval_batches, platforms=[platform])(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables),
            jax.ShapeDtypeStruct((2, 8, 28, 28, 1), jnp.uint8))
        assert str(exported.out_avals[0]) == "float32[2,8,10]"


def test_test_time_augmentation_holds_one_view_at_a_time():
    """The views run one after another: the compiled evaluation's temporaries with 9 or 18
    views stay within 25% of one view's (all at once, the default CNN's took 5.1x for 9
    views and 9.3x for 18)."""
    graphdef, state, steps = _setup()
    variables = inference_variables(state)
    images = jnp.zeros((64, 28, 28, 1), jnp.uint8)

    def temporaries(**tta):
        step = make_steps(graphdef, optax.adam(1e-3), make_loss(), **tta).eval_step
        return step.lower(variables, images).compile().memory_analysis().temp_size_in_bytes

    one = temporaries()
    assert one > 0
    assert temporaries(tta_shift=True) < 1.25 * one
    assert temporaries(tta_shift=True, tta_flip=True) < 1.25 * one


def test_dispatch_steps_divide_the_epoch():
    from fmnist_jax.input_pipeline import dispatch_steps

    # The divisor nearest to 100 (in log distance): every dispatch the same length.
    assert dispatch_steps(429) == 143  # batch 128: 3 dispatches of 143
    assert dispatch_steps(1718) == 859  # batch 32: 2 of 859
    assert dispatch_steps(390) == 78
    assert dispatch_steps(97) == 97  # a prime within range: one dispatch per epoch
    assert dispatch_steps(8) == 100  # no divisor in [50, 1000]: 100, as before
    assert dispatch_steps(429, requested=7) == 7  # --steps_per_dispatch wins
