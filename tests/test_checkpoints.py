"""Orbax checkpoints: round trips, exact resumption after SIGKILL and SIGTERM, fallbacks."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import SYNTHETIC_TRAIN, SYNTHETIC_VAL, synthetic_cmd, tiny_dataset

from fmnist_jax import Config, fit, load_model
from fmnist_jax.checkpoints import Checkpoints
from fmnist_jax.files import read_jsonl

TINY = dict(model="cnn", features=(8,), dense=16, batch_size=32, progress=False,
            steps_per_dispatch=5)
TIME_KEYS = ("wall_time_s", "epoch_time_s", "images_per_s")


def _same_numbers(records_a, records_b):
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rs]  # noqa
    assert strip(records_a) == strip(records_b)


def _assert_states_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)  # the same PRNG implementation
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def latest_state(workdir, template):
    """The newest checkpoint of ``workdir``, restored into ``template``'s structure."""
    ckpt = Checkpoints(workdir, read_only=True)
    return ckpt.restore(ckpt.steps()[-1], template)[0]


def latest_arrays(workdir) -> dict:
    ckpt = Checkpoints(workdir, read_only=True)
    return ckpt.read_arrays(ckpt.steps()[-1])


def test_round_trip(tmp_path):
    config = Config(epochs=2, **TINY)
    result = fit(config, data=tiny_dataset(), workdir=str(tmp_path))
    # params, BN statistics, Adam moments, moving averages, step, key
    _assert_states_equal(latest_state(tmp_path, result.state), result.state)
    loaded = load_model(tmp_path)  # the run's model: the last step's moving averages
    assert loaded.step == result.summary["checkpoint_step"] == 2 * (512 // 32)
    images = tiny_dataset().test.images
    np.testing.assert_array_equal(loaded.logits(images), result.classifier.logits(images))
    assert not np.array_equal(loaded.logits(images), fit(  # the EMA is what is loaded
        config.replace(ema_decay=0.0), data=tiny_dataset()).classifier.logits(images))


def test_keeps_latest_and_best(tmp_path):
    # A learning rate that makes validation accuracy peak early and then fall.
    config = Config(epochs=6, keep_checkpoints=2, checkpoint_every_steps=5, optimizer="sgd",
                    momentum=0.0, learning_rate=3.0, schedule="constant", dropout=0.3,
                    label_smoothing=0.0, **TINY)
    result = fit(config, data=tiny_dataset(), workdir=str(tmp_path))
    accs = [r["val_accuracy"] for r in result.history]
    best_epoch = accs.index(max(accs)) + 1
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert steps[-2:] == [5 * 16 + 15, 6 * 16]  # the newest two (one mid-epoch)
    assert best_epoch * 16 in steps and len(steps) == 2 + (best_epoch * 16 < 5 * 16 + 15)
    assert load_model(tmp_path, best=True).step == best_epoch * 16
    assert load_model(tmp_path).step == 6 * 16  # the run's model: no early stopping


def test_first_step_checkpoint_is_at_the_first_boundary_at_or_after_n(tmp_path):
    """--checkpoint_every_steps=12 with dispatches of 5 steps (16 an epoch): a save at the
    first boundary at or after each multiple of 12 (15, 26, 37), and at each epoch's end;
    none at the first dispatch (step 5)."""
    config = Config(epochs=3, checkpoint_every_steps=12, keep_checkpoints=100, **TINY)
    fit(config, data=tiny_dataset(), workdir=str(tmp_path))
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    # Dispatch boundaries: 5, 10, 15, 16 | 21, 26, 31, 32 | 37, 42, 47, 48.
    assert steps == [15, 16, 26, 32, 37, 48]


@pytest.mark.parametrize("optimizer", ["adam", "muon"])  # muon: a partitioned state
def test_resume_in_process_is_bitwise(tmp_path, optimizer):
    config = Config(epochs=3, checkpoint_every_steps=7, keep_checkpoints=100,
                    **{**TINY, "optimizer": optimizer})
    whole = fit(config, data=tiny_dataset(), workdir=str(tmp_path / "whole"))
    # As if the run had died at step 25: drop every later checkpoint. The newest left is
    # step 21, 5 steps into epoch 2 (16 steps an epoch, dispatches of 5).
    fit(config, data=tiny_dataset(), workdir=str(tmp_path / "cut"))
    for p in (tmp_path / "cut" / "checkpoints").iterdir():
        if int(p.name) > 25:
            shutil.rmtree(p)
    assert Checkpoints(tmp_path / "cut").read_meta(21)["step_in_epoch"] == 5
    resumed = fit(config, data=tiny_dataset(), workdir=str(tmp_path / "cut"))
    _assert_states_equal(resumed.state, whole.state)
    _same_numbers(resumed.history, whole.history)
    _same_numbers(read_jsonl(tmp_path / "cut" / "metrics.jsonl"), whole.history)
    assert resumed.summary["test_loss"] == whole.summary["test_loss"]


def test_fresh_moves_the_old_run_aside(tmp_path):
    fit(Config(epochs=1, **TINY), data=tiny_dataset(), workdir=str(tmp_path))
    fit(Config(epochs=1, fresh=True, **{**TINY, "model": "mlp"}), data=tiny_dataset(),
        workdir=str(tmp_path))
    previous = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1
    assert (previous[0] / "checkpoints" / "16").is_dir()
    assert json.loads((previous[0] / "config.json").read_text())["model"] == "cnn"
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "mlp"


STEPS_PER_EPOCH = (SYNTHETIC_TRAIN - SYNTHETIC_VAL) // 32


def _cli(workdir, data_dir, *extra):
    return synthetic_cmd(data_dir, "fmnist_jax.train", "--model=mlp", "--hidden=64",
                         "--epochs=2", "--batch_size=32", "--steps_per_dispatch=5",
                         "--checkpoint_every_steps=10", "--noprogress",
                         f"--validation_size={SYNTHETIC_VAL}", f"--workdir={workdir}", *extra)


def _steps_saved(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _run_until(cmd, workdir: Path, min_step: int, sig: int, timeout=120):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(s >= min_step for s in _steps_saved(workdir)):
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(synthetic_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    done = subprocess.run(_cli(workdir, synthetic_dir), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return workdir


def _assert_same_run(a: Path, b: Path):
    _same_numbers(read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl"))
    sa, sb = (json.loads((w / "summary.json").read_text()) for w in (a, b))
    assert (sa["test_loss"], sa["test_accuracy"]) == (sb["test_loss"], sb["test_accuracy"])
    _assert_states_equal(latest_arrays(a), latest_arrays(b))


def test_sigkill_mid_epoch_then_resume_is_bitwise(synthetic_dir, tmp_path, uninterrupted):
    code, _, _ = _run_until(_cli(tmp_path, synthetic_dir), tmp_path,
                            STEPS_PER_EPOCH + 10, signal.SIGKILL)
    assert code == -signal.SIGKILL
    saved = _steps_saved(tmp_path)
    assert saved and STEPS_PER_EPOCH < saved[-1] < 2 * STEPS_PER_EPOCH  # mid-epoch 2
    resumed = subprocess.run(_cli(tmp_path, synthetic_dir), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from checkpoint {tmp_path}/checkpoints/" in resumed.stdout
    _assert_same_run(tmp_path, uninterrupted)


def test_sigterm_checkpoints_and_says_how_to_resume(synthetic_dir, tmp_path, uninterrupted):
    code, out, err = _run_until(_cli(tmp_path, synthetic_dir), tmp_path, 20, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM: saving a checkpoint after the current step" in err
    assert f"Run the same command with --workdir={tmp_path} to resume" in err
    assert "Traceback" not in err
    meta = Checkpoints(tmp_path).read_meta(_steps_saved(tmp_path)[-1])
    assert meta["step_in_epoch"] % 5 == 0  # at a dispatch boundary, mid-run
    resumed = subprocess.run(_cli(tmp_path, synthetic_dir), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(tmp_path, uninterrupted)


def _tfds_cli(workdir, *extra):
    return [sys.executable, str(Path(__file__).parent / "mock_tfds.py"), "1000", *extra,
            "fmnist_jax.train", "--data_source=tfds", "--model=mlp", "--hidden=32",
            "--epochs=2", "--batch_size=16", "--validation_size=100",
            "--steps_per_dispatch=4", "--checkpoint_every_steps=12", "--noprogress",
            f"--workdir={workdir}"]


def test_tfds_pipeline_resumes_bitwise_after_sigkill(tmp_path):
    """The Grain pipeline over tfds: killed mid-epoch 2 right after a checkpoint, then
    resumed, it ends as a run never interrupted (metrics, test figures, every array)."""
    whole = subprocess.run(_tfds_cli(tmp_path / "whole"), capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr
    steps_per_epoch = (1000 - 100) // 16
    killed = subprocess.run(_tfds_cli(tmp_path / "cut", "--kill_after_step=60"),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    saved = _steps_saved(tmp_path / "cut")
    assert saved[-1] == 60 and steps_per_epoch < 60 < 2 * steps_per_epoch  # mid-epoch 2
    resumed = subprocess.run(_tfds_cli(tmp_path / "cut"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from checkpoint" in resumed.stdout and "epoch 2, step 4" in resumed.stdout
    _assert_same_run(tmp_path / "cut", tmp_path / "whole")
