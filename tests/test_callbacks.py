"""What runs during fit besides training: callbacks, gradient accumulation, the profiler."""

from __future__ import annotations

import gzip
import json

import jax
import numpy as np
import pytest
from conftest import tiny_dataset

from fmnist_jax import Config, StopTraining, fit
from fmnist_jax.errors import UserError
from fmnist_jax.files import read_jsonl

QUICK = dict(model="mlp", hidden=(32,), progress=False, eval_batch_size=64,
             steps_per_dispatch=4, plots=False)


class Recorder:
    """Every call it gets, in order; raises ``stop_at`` (epoch, exception) at its end."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def on_train_begin(self, logs):
        self.calls.append(("train_begin", dict(logs)))

    def on_epoch_begin(self, epoch, logs):
        self.calls.append(("epoch_begin", epoch))

    def on_epoch_end(self, epoch, logs):
        self.calls.append(("epoch_end", epoch, dict(logs)))
        if self.stop_at and epoch == self.stop_at[0]:
            raise self.stop_at[1]

    def on_train_end(self, logs):
        self.calls.append(("train_end", dict(logs)))


class OnlyEpochEnd:  # a callback may have any subset of the methods
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, epoch, logs):
        self.epochs.append((epoch, logs["val_accuracy"]))


def test_callbacks_are_called_in_keras_order_with_the_records(tmp_path):
    recorder, partial = Recorder(), OnlyEpochEnd()
    result = fit(Config(epochs=3, **QUICK), data=tiny_dataset(), workdir=str(tmp_path),
                 callbacks=[recorder, partial])
    names = [c[0] for c in recorder.calls]
    assert names == ["train_begin", "epoch_begin", "epoch_end", "epoch_begin", "epoch_end",
                     "epoch_begin", "epoch_end", "train_end"]
    assert [c[1] for c in recorder.calls if c[0] == "epoch_begin"] == [1, 2, 3]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    # logs: the epoch's record as metrics.jsonl holds it; then the summary
    assert [c[2] for c in recorder.calls if c[0] == "epoch_end"] == records == result.history
    assert recorder.calls[-1][1] == json.loads((tmp_path / "summary.json").read_text())
    assert partial.epochs == [(r["epoch"], r["val_accuracy"]) for r in records]
    assert result.summary["stopped_by"] is None


def test_stop_training_ends_the_run_cleanly_after_that_epoch(tmp_path):
    recorder = Recorder(stop_at=(2, StopTraining("good enough")))
    result = fit(Config(epochs=5, **QUICK), data=tiny_dataset(), workdir=str(tmp_path),
                 callbacks=[recorder])
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert result.summary["stopped_by"] == "Recorder.on_epoch_end: good enough"
    assert result.summary["epochs"] == 2 and result.summary["test_count"] == 256
    assert recorder.calls[-1][0] == "train_end"
    # The checkpoint of epoch 2 knows: the same command again evaluates, it does not train.
    again = fit(Config(epochs=5, **QUICK), data=tiny_dataset(), workdir=str(tmp_path))
    assert len(again.history) == 2 and again.summary["test_accuracy"] == \
        result.summary["test_accuracy"]


def test_a_failing_callback_raises_its_own_error_and_the_checkpoints_are_whole(tmp_path):
    error = ValueError("a bug in my callback")
    with pytest.raises(ValueError) as raised:
        fit(Config(epochs=4, **QUICK), data=tiny_dataset(), workdir=str(tmp_path),
            callbacks=[Recorder(stop_at=(2, error))])
    assert raised.value is error
    # Epoch 1's checkpoint (and the one being written at epoch 2, if any) is complete:
    # the run resumes from it and finishes.
    resumed = fit(Config(epochs=4, **QUICK), data=tiny_dataset(), workdir=str(tmp_path))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]


def test_a_callback_without_any_method_is_refused():
    with pytest.raises(TypeError, match="has none of the methods"):
        fit(Config(epochs=1, **QUICK), data=tiny_dataset(), callbacks=[object()])


def test_accumulated_micro_batches_give_the_parameters_of_whole_batches():
    """SGD, no dropout, no batch norm: 4 micro-batches of 16 then one update are 1 batch of
    64, over 16 updates (2 epochs of 512 images)."""
    common = dict(optimizer="sgd", momentum=0.0, learning_rate=0.05, schedule="constant",
                  ema_decay=0.0, dropout=0.0, label_smoothing=0.0, epochs=2,
                  **{**QUICK, "steps_per_dispatch": None})
    whole = fit(Config(batch_size=64, **common), data=tiny_dataset())
    micro = fit(Config(batch_size=16, accumulate_steps=4, **common), data=tiny_dataset())
    assert int(micro.state.step) == 4 * int(whole.state.step) == 64
    a, b = jax.tree.leaves(whole.state.params), jax.tree.leaves(micro.state.params)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) < 1e-5
    initial = fit(Config(batch_size=64, **{**common, "epochs": 0}), data=tiny_dataset())
    moved = max(float(np.abs(x - y).max())
                for x, y in zip(a, jax.tree.leaves(initial.state.params)))
    assert moved > 1e-2  # the comparison is not between two untrained models


def test_schedules_count_updates_when_accumulating(capsys):
    config = Config(batch_size=16, accumulate_steps=4, epochs=2, learning_rate=0.1,
                    schedule="warmup_cosine", warmup_epochs=1.0, **QUICK)
    result = fit(config, data=tiny_dataset())
    started = capsys.readouterr()
    assert "2 epochs of 32 micro-batches x 16, an update every 4 (64 images)" in \
        started.out + started.err
    # 32 micro-batches an epoch, 8 updates: warm-up ends at update 8, cosine ends at 16.
    assert [r["step"] for r in result.history] == [32, 64]
    assert result.history[0]["learning_rate"] == pytest.approx(0.1)
    assert result.history[1]["learning_rate"] == pytest.approx(0.0, abs=1e-9)


def test_profile_steps_writes_a_trace_of_steady_state_steps(tmp_path):
    fit(Config(epochs=2, profile_steps=3, **QUICK), data=tiny_dataset(),
        workdir=str(tmp_path))
    runs = list((tmp_path / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1
    assert list(runs[0].glob("*.xplane.pb"))  # TensorBoard's profile plugin reads it
    perfetto = runs[0] / "perfetto_trace.json.gz"  # ui.perfetto.dev opens it
    events = json.loads(gzip.decompress(perfetto.read_bytes()))
    assert any("train" in str(e.get("name", "")) for e in events["traceEvents"])


def test_profile_steps_needs_a_workdir():
    with pytest.raises(UserError, match="--profile_steps writes its trace into the workdir"):
        fit(Config(epochs=1, profile_steps=3, **QUICK), data=tiny_dataset())
