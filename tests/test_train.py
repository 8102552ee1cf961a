"""The training run: real-data smoke test, determinism, workdir files, custom experiments."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from conftest import tiny_dataset
from flax import nnx

import fmnist_jax
from fmnist_jax import Config, fit, preset
from fmnist_jax.errors import UserError
from fmnist_jax.files import read_jsonl

QUICK = dict(progress=False, eval_batch_size=100, steps_per_dispatch=7)


def test_real_data_smoke(real_data_dir, tmp_path):
    """Two epochs of the seed MLP on the real data: > 85% test accuracy in a few seconds."""
    config = Config(model="mlp", epochs=2, data_dir=str(real_data_dir), **QUICK)
    result = fit(config, workdir=str(tmp_path))
    s = result.summary
    assert s["test_count"] == 10_000 and s["num_params"] == 266_610
    assert s["test_accuracy"] > 0.85 and s["val_accuracy"] > 0.86  # 86.7%, 87.8% measured
    assert s["steps"] == 2 * (55_000 // 128)
    assert (tmp_path / "summary.json").is_file()


def test_writes_config_metrics_and_summary(tmp_path):
    config = Config(model="mlp", epochs=3, batch_size=64, learning_rate=1e-3,
                    warmup_epochs=1.0, test_every_epoch=True, **QUICK)
    fit(config, data=tiny_dataset(), workdir=str(tmp_path))
    assert Config.from_dict(json.loads((tmp_path / "config.json").read_text())) == config
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [8, 16, 24]  # 512 images // 64
    for key in ("learning_rate", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                "wall_time_s", "epoch_time_s", "images_per_s", "test_loss", "test_accuracy",
                "process_age_s"):  # the last three with --test_every_epoch
        assert all(isinstance(r[key], float) for r in records), key
    # warmup_cosine: 1 epoch of warm-up then cosine to 0 at the last step.
    assert records[0]["learning_rate"] == pytest.approx(1e-3)
    assert records[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-12)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "val_accuracy", "epochs", "wall_time_s",
                "train_images_per_s", "num_params", "model", "jax_backend"):
        assert key in summary, key
    assert summary["epochs"] == 3 and summary["test_count"] == 256
    assert summary["jax_backend"] == jax.default_backend() and summary["model"] == "mlp"
    assert summary["test_accuracy"] > 0.9  # the synthetic classes are easy


def test_process_age_counts_from_the_process_start():
    """Start-up, time to 93% and the time after the test line are ages of the process: never
    less than the time its own code ran, never more than its parent waited for it (psutil's
    age, from a boot time truncated to the second, was 0.72 s too long on one machine)."""
    code = ("import time; t = time.perf_counter(); from fmnist_jax.report import process_age; "
            "print(process_age(), time.perf_counter() - t)")
    launched = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    waited = time.perf_counter() - launched
    age, ran = map(float, done.stdout.split())
    assert ran <= age <= waited + 0.01  # the kernel counts the start in 10 ms ticks


def test_same_seed_same_metrics():
    config = Config(model="cnn", features=(8,), dense=16, epochs=2, batch_size=32, **QUICK)
    a = fit(config, data=tiny_dataset())
    b = fit(config, data=tiny_dataset())
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
    assert a.summary["test_loss"] == b.summary["test_loss"]
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_array_equal(x, y)
    c = fit(config.replace(seed=1), data=tiny_dataset())
    assert c.summary["test_loss"] != a.summary["test_loss"]


def test_resnet_preset_trains_with_every_augmentation():
    """The resnet preset's step (crop, flip, erasing, label smoothing, EMA) on a small
    ResNet. Flipping before erasing once made XLA:CPU compile this step for over 5 minutes;
    the suite would hang here."""
    config = preset("resnet", features=(8, 16), blocks=1, epochs=2, batch_size=32, **QUICK)
    result = fit(config, data=tiny_dataset())
    assert result.summary["steps"] == 2 * (len(tiny_dataset().train.labels) // 32)
    assert result.summary["test_accuracy"] > 0.3  # ten classes: chance is 0.1 (40% seen)
    plain = fit(config.replace(random_crop=0, random_flip=False, random_erasing=0.0),
                data=tiny_dataset())
    assert plain.history[0]["train_loss"] != result.history[0]["train_loss"]  # it augmented


def test_mixup_and_cutmix_train_from_their_flags():
    """--mixup and --cutmix reach the train step: a run that mixes learns, with another
    first-epoch loss than without; out-of-range values are refused by name."""
    from fmnist_jax.cli import parse_config

    config = preset("cnn", features=(8, 16), dense=32, epochs=2, batch_size=32, **QUICK)
    mixed = fit(config.replace(mixup=0.4, cutmix=1.0, mix_prob=0.5), data=tiny_dataset())
    plain = fit(config, data=tiny_dataset())
    assert mixed.summary["test_accuracy"] > 0.3  # ten classes: chance is 0.1
    assert mixed.history[0]["train_loss"] > plain.history[0]["train_loss"]
    assert (mixed.config.cutmix, mixed.config.mix_prob) == (1.0, 0.5)
    for flag, message in (("--mixup=-1", "--mixup must be 0 or more"),
                          ("--cutmix=-0.5", "--cutmix must be 0 or more"),
                          ("--mix_prob=1.5", r"--mix_prob must be in \[0, 1\]")):
        with pytest.raises(UserError, match=message):
            parse_config([flag])


def test_best_epoch_and_early_stopping_are_derived_from_the_history():
    from fmnist_jax.loop import Progress, best_epoch

    history = [{"epoch": e, "val_accuracy": a, "val_loss": l}
               for e, (a, l) in enumerate([(0.5, 0.9), (0.7, 0.6), (0.7, 0.5), (0.6, 0.7)], 1)]
    assert best_epoch(history, "val_accuracy") == 2  # the earliest of a tie
    assert best_epoch(history, "val_loss") == 3  # lower is better
    assert best_epoch([{"epoch": 1, "loss": 0.3}], "val_accuracy") == 0
    progress = Progress(epochs=9, monitor="val_accuracy", patience=2, epoch=5, history=history)
    assert progress.stopped_early and progress.finished  # epochs 3 and 4 did not improve
    progress.patience = 3
    assert not progress.stopped_early and not progress.finished
    assert not Progress(epochs=9, patience=0, epoch=5, history=history).stopped_early


def test_early_stopping_restores_the_best_epoch():
    # A learning rate so high that the validation loss wanders up and down.
    config = Config(model="mlp", epochs=10, patience=2, monitor="val_loss",
                    learning_rate=0.1, schedule="constant", **QUICK)
    data = tiny_dataset()
    result = fit(config, data=data)
    losses = [r["val_loss"] for r in result.history]
    best = losses.index(min(losses))
    assert len(result.history) < 10  # it did stop early
    assert result.summary["best_epoch"] == best + 1
    assert result.summary["epochs"] == best + 1 + 2
    # The run's model is the best epoch's weights: evaluated again, they give its
    # validation loss exactly, and the summary's test figures are theirs. (The training
    # state returned is the last one, to go on from.)
    assert int(result.state.step) == result.history[-1]["step"]
    assert result.summary["checkpoint_step"] == result.history[best]["step"]
    assert result.summary["steps"] == result.history[-1]["step"] > result.history[best]["step"]
    assert result.classifier.evaluate(*data.validation)["loss"] == losses[best]
    assert result.classifier.evaluate(*data.test)["accuracy"] == \
        result.summary["test_accuracy"]


def test_test_time_augmentation_is_the_run_models_evaluation_not_the_epochs(tmp_path):
    """With --tta_shift --tta_flip the summary's validation and test figures, the classifier
    and fmnist-evaluate's model use the 18 views; the per-epoch validation (metrics.jsonl,
    early stopping) evaluates each image once, so it costs no more than without."""
    import dataclasses

    from fmnist_jax.inference import load_model

    config = Config(model="cnn", features=(4, 8), dense=16, epochs=2, batch_size=64,
                    random_crop=1, tta_shift=True, tta_flip=True, **QUICK)
    data = tiny_dataset()
    result = fit(config, data=data, workdir=str(tmp_path))
    s, classifier = result.summary, result.classifier
    assert (s["tta_shift"], s["tta_flip"]) == (True, True)
    assert (classifier.tta_shift, classifier.tta_flip) == (True, True)
    plain = dataclasses.replace(classifier, tta_shift=False, tta_flip=False)
    assert result.history[-1]["val_loss"] == plain.evaluate(*data.validation)["loss"]
    assert s["val_loss"] == classifier.evaluate(*data.validation)["loss"] != \
        result.history[-1]["val_loss"]
    assert s["test_loss"] == classifier.evaluate(*data.test)["loss"] != \
        plain.evaluate(*data.test)["loss"]
    loaded = load_model(tmp_path)
    assert (loaded.tta_shift, loaded.tta_flip) == (True, True)
    assert loaded.evaluate(*data.test)["loss"] == s["test_loss"]


def test_bad_batch_size():
    with pytest.raises(UserError, match="--batch_size=1000 must be between 1 and the 512"):
        fit(Config(model="mlp", epochs=1, batch_size=1000, **QUICK), data=tiny_dataset())


class TinyNet(nnx.Module):
    """A user's own model: one hidden layer with dropout, its mode an argument."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(784, 64, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x, *, train=False, rngs=None):
        x = nnx.gelu(self.hidden(x.reshape(len(x), -1)))
        return self.out(self.dropout(x, deterministic=not train, rngs=rngs))


def test_custom_model_optimizer_and_loss():
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.inject_hyperparams(optax.lion)(learning_rate=3e-4))
    loss_fn = lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(  # noqa
        logits, labels)
    data = tiny_dataset()
    result = fmnist_jax.fit(Config(epochs=3, batch_size=64, **QUICK),
                            model=TinyNet(nnx.Rngs(0)), optimizer=optimizer, loss_fn=loss_fn,
                            data=data)
    assert result.summary["model"] == "TinyNet"
    assert result.summary["num_params"] == 784 * 64 + 64 + 650
    assert result.history[0]["learning_rate"] == pytest.approx(3e-4)  # via inject_hyperparams
    assert result.summary["test_accuracy"] > 0.9
    # result.predict takes raw pixels and gives the summary's test accuracy, exactly.
    probs = result.predict(data.test.images)
    assert probs.shape == (256, 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert (probs.argmax(-1) == data.test.labels).mean() == result.summary["test_accuracy"]
    np.testing.assert_array_equal(result.predict(data.test.images[:5].astype(np.float32)),
                                  probs[:5])  # 0-255 floats: the same
    with pytest.raises(UserError, match="pixel values lie in 0-1"):
        result.predict(data.test.images[:5] / 255.0)


def test_tfds_stream_without_tensorflow():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = Config(model="mlp", data_source="tfds", epochs=1, batch_size=16,
                    validation_size=16, **{**QUICK, "eval_batch_size": 24})
    with tfds.testing.mock_data(num_examples=96):
        result = fit(config)
    assert result.summary["steps"] == (96 - 16) // 16
    assert result.summary["test_count"] == 96  # every test example, the last batch masked
    assert result.summary["data_source"] == "tfds"


def test_stream_stops_its_threads_when_an_epoch_is_left_half_read():
    """Early stopping or an error leaves an epoch's stream half read: Grain's reading
    threads must stop, not wait forever on a full buffer."""
    import threading

    from fmnist_jax.input_pipeline import Streamed
    from fmnist_jax.parallel import setup

    records = [{"image": np.full((28, 28, 1), i % 255, np.uint8), "label": i % 10}
               for i in range(4000)]
    stream = Streamed({"train": records, "test": records[:100]}, devices=setup(),
                      batch_size=16, eval_batch_size=50, steps_per_dispatch=2,
                      validation_size=100, seed=0)

    class Steps:  # the stream's only use of the steps: one call per dispatch
        @staticmethod
        def train_batches(state, images, labels):
            return state, {"loss": np.zeros(len(labels))}

    before = threading.active_count()
    epoch = stream.train_epoch(None, 1, Steps)
    assert next(epoch)[2] == 2 and next(epoch)[2] == 2
    epoch.close()  # what the loop does when it stops mid-epoch
    import time

    for _ in range(50):  # executor threads finish their current read, then exit
        if threading.active_count() <= before:
            break
        time.sleep(0.1)
    assert threading.active_count() <= before


def test_tensorboard_events_hold_every_epoch(tmp_path):
    """--tensorboard: event files (tensorboardX, no TensorFlow) with the metrics.jsonl
    values, read back record by record."""
    import struct

    from tensorboardX.proto import event_pb2

    config = Config(model="mlp", epochs=2, batch_size=64, tensorboard=True, **QUICK)
    fit(config, data=tiny_dataset(), workdir=str(tmp_path))
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    data, scalars, at = events.read_bytes(), {}, 0
    while at < len(data):  # TFRecord: length, crc, payload, crc
        (length,) = struct.unpack("<Q", data[at:at + 8])
        event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            scalars[(value.tag, event.step)] = value.simple_value
    records = read_jsonl(tmp_path / "metrics.jsonl")
    for r in records:
        assert scalars[("loss/train", r["epoch"])] == pytest.approx(r["train_loss"], rel=1e-6)
        assert scalars[("accuracy/val", r["epoch"])] == pytest.approx(r["val_accuracy"],
                                                                      rel=1e-6)
        assert ("run/learning_rate", r["epoch"]) in scalars


def test_progress_rates_count_only_steps_done(monkeypatch, capsys):
    """The progress bar starts with its epoch: every dispatch here takes at least 0.3 s for
    4 steps, so no rate it shows can pass 4 / 0.3 steps a second (the first update of each
    epoch showed hundreds of thousands, the bar created after the dispatch had run)."""
    import re
    import time

    from fmnist_jax import input_pipeline

    original = input_pipeline.DeviceResident.train_epoch

    def slow(self, *args, **kwargs):
        for out in original(self, *args, **kwargs):
            time.sleep(0.3)
            yield out

    monkeypatch.setattr(input_pipeline.DeviceResident, "train_epoch", slow)
    fit(Config(model="mlp", epochs=2, batch_size=64,
               **{**QUICK, "progress": True, "steps_per_dispatch": 4}), data=tiny_dataset())
    rates = [float(r) for r in re.findall(r"([0-9.]+)step/s", capsys.readouterr().err)]
    assert rates and max(rates) < 4 / 0.3, rates


def test_a_run_that_fails_before_training_leaves_no_workdir(tmp_path):
    """Data not found: the workdir this run created is gone again; one that was there
    stays."""
    config = Config(model="mlp", data_dir=str(tmp_path / "nowhere"), **QUICK)
    with pytest.raises(UserError, match="does not exist"):
        fit(config, workdir=str(tmp_path / "runs" / "new"))
    assert not (tmp_path / "runs" / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError, match="does not exist"):
        fit(config, workdir=str(tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir()


def test_both_pipelines_are_the_pipeline_protocol():
    """The loop's one view of its data: each pipeline has the Protocol's methods with its
    signature."""
    import inspect

    from fmnist_jax.input_pipeline import DeviceResident, Pipeline, Streamed

    for name in ("train_epoch", "evaluate", "split"):
        expected = inspect.signature(getattr(Pipeline, name))
        for cls in (DeviceResident, Streamed):
            assert inspect.signature(getattr(cls, name)) == expected, (cls, name)


def test_whiten_starts_the_first_convolution_from_the_training_images():
    from fmnist_jax import parallel
    from fmnist_jax.build import build
    from fmnist_jax.models import whitening_filters
    from fmnist_jax.steps import normalize

    data = tiny_dataset()
    config = Config(whiten=True, features=(32, 16), dense=16, **QUICK)
    built = build(config, parallel.setup(), data=data)
    plain = build(Config(features=(32, 16), dense=16, **QUICK), parallel.setup(), data=data)
    spec = data.spec()
    filters = whitening_filters(normalize(data.train.images, (spec.mean, spec.std)))
    kernel = np.asarray(built.state.params["convs"][0]["kernel"])
    np.testing.assert_allclose(kernel[..., :18], filters, rtol=1e-6)
    np.testing.assert_array_equal(kernel[..., 18:],
                                  np.asarray(plain.state.params["convs"][0]["kernel"])[..., 18:])
    # And it trains
    result = fit(dataclasses.replace(config, epochs=1), data=data)
    assert result.summary["test_accuracy"] > 0.5
    with pytest.raises(UserError, match=r"--model must be cnn or resnet for --whiten "
                                        r"\(got model=mlp\)"):
        Config(model="mlp", whiten=True).validate()
    with pytest.raises(UserError, match=r"whitening_filters\(images\) before fit"):
        fit(config, model=fmnist_jax.create_model("cnn", rngs=nnx.Rngs(0)), data=data)
