"""Fault injection: every way a user or the machine can break a run, by name.

Each scenario must end with a clear message (one line for flags and data), a non-zero exit
status, no traceback, and nothing lost: no partial file, the previous checkpoint intact.
Scenarios tested elsewhere are listed at the end of this docstring.

Also covered in other files:
- the IDX reader on each malformed file, generated: tests/test_data.py::test_rejects_bad_files
- download interrupted half-way or with a wrong checksum, nothing left in the cache:
  tests/test_data.py::test_interrupted_download_leaves_nothing, ..._wrong_checksum_...
- SIGKILL mid-epoch and SIGTERM during training, then exact resumption:
  tests/test_checkpoints.py::test_sigkill_..., test_sigterm_...
"""

from __future__ import annotations

import gc
import gzip
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (SYNTHETIC_TEST, SYNTHETIC_TRAIN, SYNTHETIC_VAL, LocalMirror,
                      read_one_line_then_close, synthetic_cmd, tiny_dataset)

from fmnist_jax import Config, fit, train
from fmnist_jax.checkpoints import Checkpoints, WorkdirLock
from fmnist_jax.errors import UserError
from fmnist_jax.loop import Interrupted, StopSignal

TINY = dict(model="cnn", features=(8,), dense=16, batch_size=32, progress=False,
            steps_per_dispatch=5)


def run_main(capsys, *args) -> tuple[int, str]:
    """Runs the training CLI in this process; returns (exit status, stderr)."""
    try:
        code = train.main([*map(str, args)])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ data

@pytest.fixture
def data_copy(use_synthetic, tmp_path):
    """A private copy of the four files (the generated set, with its checksums in place of
    the official ones), to damage."""
    target = tmp_path / "data"
    shutil.copytree(use_synthetic, target, ignore=shutil.ignore_patterns("*.json"))
    return target


def _rewrite(path: Path, change) -> None:
    payload = bytearray(gzip.decompress(path.read_bytes()))
    path.write_bytes(gzip.compress(bytes(change(payload))))


def _labels_with_12(p):
    p[8 + 5] = 12
    return p


def _flip_a_pixel(p):
    p[16 + 1000] ^= 1
    return p


DATA_FAULTS = {
    "three of four files": (lambda d: (d / "t10k-labels-idx1-ubyte.gz").unlink(),
                            "lacks t10k-labels-idx1-ubyte.gz"),
    "truncated gz": (lambda d: (d / "t10k-images-idx3-ubyte.gz").write_bytes(
        (d / "t10k-images-idx3-ubyte.gz").read_bytes()[:100_000]), "is truncated"),
    "wrong magic": (lambda d: _rewrite(d / "t10k-labels-idx1-ubyte.gz",
                                       lambda p: b"\0\0\x08\x03" + p[4:]),
                    "magic number 0x00000803, expected 0x00000801"),
    "wrong dimensions": (lambda d: _rewrite(d / "t10k-images-idx3-ubyte.gz",
                                            lambda p: p[:12] + (27).to_bytes(4, "big")
                                            + p[16:]),
                         f"dimensions ({SYNTHETIC_TEST}, 28, 27), expected "
                         f"({SYNTHETIC_TEST}, 28, 28)"),
    "wrong count": (lambda d: _rewrite(d / "t10k-labels-idx1-ubyte.gz",
                                       lambda p: p[:4] + (SYNTHETIC_TEST - 1).to_bytes(4, "big")
                                       + p[8:-1]),
                    f"dimensions ({SYNTHETIC_TEST - 1},), expected ({SYNTHETIC_TEST},)"),
    "labels outside 0-9": (lambda d: _rewrite(d / "train-labels-idx1-ubyte.gz",
                                              _labels_with_12), "label 12, outside 0-9"),
    "checksum mismatch": (lambda d: _rewrite(d / "train-images-idx3-ubyte.gz",
                                             _flip_a_pixel), "fails its checksum"),
}


@pytest.mark.parametrize("scenario", DATA_FAULTS)
def test_data_fault(scenario, data_copy, tmp_path, capsys):
    damage, message = DATA_FAULTS[scenario]
    damage(data_copy)
    before = sorted((p.name, p.stat().st_size) for p in data_copy.iterdir())
    code, err = run_main(capsys, f"--data_dir={data_copy}", f"--workdir={tmp_path}/w",
                         "--noprogress")
    assert code == 2
    line = one_line(err)
    assert message in line and str(data_copy) in line
    assert sorted((p.name, p.stat().st_size) for p in data_copy.iterdir()) == before


def test_unreadable_data_directory(data_copy, tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == data_copy
                        else real_access(p, mode))
    code, err = run_main(capsys, f"--data_dir={data_copy}", f"--workdir={tmp_path}/w")
    assert code == 2 and "cannot be read (permission denied)" in one_line(err)


class _StallingMirror(LocalMirror):
    """Sends the first 64 KiB of a file, then waits until closed."""

    def __init__(self, directory: Path):
        self.release = threading.Event()
        self.sent = threading.Event()
        super().__init__(directory)

    def send(self, body, outputfile):
        outputfile.write(body[:65536])
        outputfile.flush()
        self.sent.set()
        self.release.wait(30)

    def close(self):
        self.release.set()
        super().close()


def test_sigint_while_downloading_leaves_no_partial_file(synthetic_dir, tmp_path):
    """Interrupt during data loading: a download in progress."""
    server = _StallingMirror(synthetic_dir)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path),
           "FMNIST_MIRRORS": server.url, "FMNIST_DATA_DIR": ""}  # "": look, then download
    try:
        proc = subprocess.Popen(synthetic_cmd(synthetic_dir, "fmnist_jax.train",
                                              "--noprogress", f"--workdir={tmp_path}/w"),
                                env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert server.sent.wait(120)
        # Once the first bytes are on disk, the download is in its read loop: a SIGINT
        # within urllib's setup would hit Python's own cleanup (on 3.13, an "Exception
        # ignored" from a half-made http.client.HTTPResponse), which is not this test's.
        deadline = time.monotonic() + 120
        while not any(f.stat().st_size for f in (tmp_path / "cache").rglob("*")
                      if f.is_file()) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        server.close()
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT outside the training loop" in err
    assert "no training had been saved" in err and "Traceback" not in err
    cache = tmp_path / "cache" / "fmnist_jax"
    assert [p.name for p in cache.iterdir() if p.is_file()] == []  # no *.part, no .gz


@pytest.mark.parametrize("ours", [True, False])
def test_sigint_while_a_progress_bar_is_built_prints_no_traceback(ours, monkeypatch):
    """A Ctrl-C can land inside tqdm's ``__init__`` (the download above, one run in a few
    dozen on a loaded machine): tqdm's finaliser then fails on the missing attributes and
    Python prints its traceback under our one-line message. Our bars do not; plain tqdm
    shows the test reproduces the fault."""
    import tqdm.auto
    import tqdm.std

    from fmnist_jax.progress import progress_bar

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tqdm.std.tqdm, "_get_free_pos", interrupted)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(KeyboardInterrupt):
        (progress_bar if ours else tqdm.auto.tqdm)(total=10, disable=False)
    gc.collect()
    assert [type(u.exc_value) for u in unraisable] == ([] if ours else [AttributeError])


def test_closed_output_pipe_stops_with_one_line(synthetic_dir, tmp_path):
    """``fmnist-train ... | head -1``: the reader goes away after the first line."""
    # The pipe closes before the first epoch's line: that epoch has to compile first.
    line, code, err = read_one_line_then_close(synthetic_cmd(
        synthetic_dir, "fmnist_jax.train", "--noprogress", "--model=mlp", "--epochs=3",
        "--plots=false", f"--validation_size={SYNTHETIC_VAL}", f"--workdir={tmp_path}/w"))
    assert line.startswith("fmnist_jax: mlp")
    assert code == 128 + signal.SIGPIPE, err
    assert err.startswith("fmnist-train: stopped, its output pipe was closed; the "
                          f"checkpoints in {tmp_path}/w are complete") and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir()
                  if p.name.isdigit()) == [str((SYNTHETIC_TRAIN - SYNTHETIC_VAL) // 128)]


# ------------------------------------------------------------------ flags

@pytest.mark.parametrize("args, message", [
    (["--model=vgg"], "argument --model: invalid choice: 'vgg'"),
    (["--optimizer=lbfgs"], "argument --optimizer: invalid choice: 'lbfgs'"),
    (["--schedule=linear"], "argument --schedule: invalid choice: 'linear'"),
    (["--loss=hinge"], "argument --loss: invalid choice: 'hinge'"),
    (["--learning_rate=-1"], "--learning_rate must be positive (got learning_rate=-1.0)"),
    (["--learning_rate=0"], "--learning_rate must be positive (got learning_rate=0.0)"),
    (["--batch_size=0"], "--batch_size must be positive (got batch_size=0)"),
    (["--epochs=-2"], "--epochs must be 0 or more (got epochs=-2)"),
    (["--epochs=two"], "argument --epochs: invalid int value: 'two'"),
    (["--bogus=1"], "unrecognized arguments: --bogus=1"),
])
def test_bad_flag(args, message, capsys):
    code, err = run_main(capsys, *args)
    assert code == 2 and message in one_line(err)


def test_a_directory_without_its_flag_is_named_with_the_flag(tmp_path, capsys):
    """``fmnist-train runs/cnn`` (or ``fmnist-evaluate runs/cnn``): the fix is spelled
    out; any other stray word still points to --help."""
    code, err = run_main(capsys, tmp_path)
    assert code == 2 and one_line(err).endswith(
        f"unrecognized arguments: {tmp_path} (for a run's directory: --workdir={tmp_path})")
    code, err = run_main(capsys, "cnn")
    assert code == 2 and one_line(err).endswith("unrecognized arguments: cnn (see --help)")


@pytest.mark.parametrize("args, message", [
    (["--batch_size=60000", f"--validation_size={SYNTHETIC_VAL}"],
     f"--batch_size=60000 must be between 1 and the {SYNTHETIC_TRAIN - SYNTHETIC_VAL} "
     "training"),
    (["--validation_size=60000"], f"--validation_size=60000 must be in [0, {SYNTHETIC_TRAIN})"),
])
def test_bad_flag_that_needs_the_data(args, message, use_synthetic, tmp_path, capsys):
    code, err = run_main(capsys, f"--workdir={tmp_path}/w", *args)
    assert code == 2 and message in one_line(err)


def test_workdir_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("precious")
    code, err = run_main(capsys, f"--workdir={tmp_path}/file")
    assert code == 2 and "is a file; give a directory" in one_line(err)
    assert (tmp_path / "file").read_text() == "precious"


def test_workdir_not_writable(tmp_path, capsys, monkeypatch):
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro"
                        else real_access(p, mode))
    code, err = run_main(capsys, f"--workdir={tmp_path}/ro")
    assert code == 2 and "is not writable" in one_line(err)


# ------------------------------------------------------------------ numerics

def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(
        use_synthetic, tmp_path, capsys):
    # SGD with a warm-up from 0: the first step is harmless, then a learning rate of 1e6
    # explodes. (Adam's steps are bounded by the learning rate: it only diverges.)
    code, err = run_main(capsys, "--model=mlp", "--optimizer=sgd", "--learning_rate=1e6",
                         "--epochs=1", "--steps_per_dispatch=1", "--checkpoint_every_steps=1",
                         f"--validation_size={SYNTHETIC_VAL}", f"--workdir={tmp_path}",
                         "--noprogress")
    assert code == 2
    line = one_line(err)
    assert "the training loss became NaN or infinite at step" in line
    assert "Likely cause: a learning rate too high" in line and "--learning_rate=1e+06" in line
    bad = int(line.split("at step ")[1].split()[0])
    good = int(line.split("last good checkpoint (step ")[1].split(")")[0])
    assert 0 < good < bad
    ckpt = Checkpoints(tmp_path)
    assert ckpt.steps()[-1] == good
    assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(
        ckpt.read_arrays(good)["params"]))
    assert any((tmp_path / "checkpoints.nonfinite").iterdir())  # the bad one, set aside


def test_debug_nans_flag_turns_on_jax_checking(tmp_path):
    import jax

    with pytest.raises(FloatingPointError):
        fit(Config(epochs=1, optimizer="sgd", learning_rate=1e6, debug_nans=True, **TINY),
            data=tiny_dataset())
    assert not jax.config.jax_debug_nans  # turned off again


# ------------------------------------------------------------------ checkpoints

def test_checkpoint_of_another_model(tmp_path, capsys, use_synthetic):
    fit(Config(epochs=1, **TINY), data=tiny_dataset(), workdir=str(tmp_path))
    code, err = run_main(capsys, "--model=mlp", f"--workdir={tmp_path}",
                         f"--validation_size={SYNTHETIC_VAL}")
    assert code == 2
    assert "is of another model (--model=cnn there, mlp here" in one_line(err)
    assert Checkpoints(tmp_path).steps() == [16]


def test_workdir_in_use(tmp_path, capsys):
    lock = WorkdirLock(tmp_path)
    try:
        code, err = run_main(capsys, f"--workdir={tmp_path}")
    finally:
        lock.release()
    assert code == 2 and f"--workdir={tmp_path} is in use by another run (pid" in one_line(err)


def test_corrupt_latest_checkpoint_falls_back(tmp_path, capfd):
    config = Config(epochs=3, **TINY)
    whole = fit(config, data=tiny_dataset(), workdir=str(tmp_path / "whole"))
    fit(config, data=tiny_dataset(), workdir=str(tmp_path / "bad"))
    for f in (tmp_path / "bad" / "checkpoints" / "48").rglob("*"):
        if f.is_file() and (f.parent.name in ("d", "ocdbt.process_0") or f.name == "metadata"):
            f.write_bytes(b"\0garbage")
    capfd.readouterr()
    resumed = fit(config, data=tiny_dataset(), workdir=str(tmp_path / "bad"))
    err = capfd.readouterr().err
    assert "is unreadable" in err and "trying the previous one" in err
    assert any((tmp_path / "bad" / "checkpoints.corrupt").iterdir())  # kept, not deleted
    assert resumed.summary["test_loss"] == whole.summary["test_loss"]  # redid epoch 3


def test_every_checkpoint_corrupt_says_it_starts_over(tmp_path, capfd):
    config = Config(epochs=1, **TINY)
    fit(config, data=tiny_dataset(), workdir=str(tmp_path))
    for f in (tmp_path / "checkpoints" / "16").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])  # truncated
    capfd.readouterr()
    fit(config, data=tiny_dataset(), workdir=str(tmp_path))
    err = capfd.readouterr().err
    assert "is unreadable (ValueError: OUT_OF_RANGE" in err
    assert "training starts again from step 0" in err


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), MemoryError(),
                                   ValueError("RESOURCE_EXHAUSTED: out of memory")])
def test_transient_restore_error_stops_and_keeps_every_checkpoint(error, tmp_path,
                                                                   monkeypatch):
    """An error that does not prove the checkpoint damaged (I/O, memory) must not set it
    aside, nor start training again from step 0: the run stops, saying so."""
    config = Config(epochs=2, **TINY)
    fit(config, data=tiny_dataset(), workdir=str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "32")  # as if stopped after epoch 1
    before = sorted(p.name for p in tmp_path.iterdir())

    def failing(self, step, template, **kwargs):
        raise error

    monkeypatch.setattr(Checkpoints, "restore", failing)
    with pytest.raises(UserError, match=r"could not read checkpoint .*/checkpoints/16 "
                                        rf"\({type(error).__name__}.*every checkpoint was "
                                        r"left in place"):
        fit(config, data=tiny_dataset(), workdir=str(tmp_path))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no checkpoints.corrupt
    assert Checkpoints(tmp_path).steps() == [16]
    assert fit(config, data=tiny_dataset(), workdir=str(tmp_path)).history[0]["step"] == 16


def test_checkpoint_metadata_is_a_snapshot(tmp_path, monkeypatch):
    """Orbax writes a checkpoint's metadata on its own thread. Here it writes each one only
    after training has gone on by a whole epoch (as on a slow file system): each must still
    hold the history of its own step, no later epoch."""
    original = ocp.handlers.JsonCheckpointHandler._save_fn
    release = {}

    async def late(self, x, directory):  # called for each JSON item: meta and metrics
        step = int(Path(directory).parent.name.split(".")[0])
        if step < 48:
            release.setdefault(step, threading.Event()).wait(30)  # until the next epoch
        return await original(self, x, directory)

    save = Checkpoints.save

    def release_then_save(self, *args, **kwargs):  # the next epoch is in the history now
        for event in release.values():
            event.set()
        return save(self, *args, **kwargs)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", late)
    monkeypatch.setattr(Checkpoints, "save", release_then_save)
    fit(Config(epochs=3, **TINY), data=tiny_dataset(), workdir=str(tmp_path))
    monkeypatch.undo()
    ckpt = Checkpoints(tmp_path)
    for step, epochs in ((16, [1]), (32, [1, 2]), (48, [1, 2, 3])):
        assert [r["epoch"] for r in ckpt.read_meta(step)["history"]] == epochs


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    original = ocp.handlers.JsonCheckpointHandler._save_fn
    saves = []

    async def disk_full_after_the_first(self, x, directory):  # writes ``meta``, ``metrics``
        step = int(Path(directory).parent.name.split(".")[0])  # <step>.orbax-checkpoint-tmp-*
        saves.append(step)
        if step == 16:
            return await original(self, x, directory)
        (Path(directory) / "metadata").write_text('{"trunc')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn",
                        disk_full_after_the_first)
    with pytest.raises(UserError, match=r"could not write a checkpoint .*No space left on "
                                        r"device.*previous checkpoints are intact \(steps 16\)"):
        fit(Config(epochs=2, **TINY), data=tiny_dataset(), workdir=str(tmp_path))
    monkeypatch.undo()
    assert 32 in saves
    assert Checkpoints(tmp_path).steps() == [16]
    assert Checkpoints(tmp_path).read_arrays(16)["step"] == 16


# ------------------------------------------------------------------ predict

@pytest.mark.parametrize("scenario, make, message", [
    ("not an image", lambda p: p.write_text("hello"), "is not an image Pillow can read"),
    ("empty file", lambda p: p.write_bytes(b""), "is empty"),
    ("huge image", lambda p: __import__("PIL.Image").Image.new("L", (5000, 10)).save(
        p, format="PNG"), "larger than 4096 px"),
    ("missing path", lambda p: None, "does not exist"),
])
def test_predict_bad_input(scenario, make, message, tmp_path, capsys):
    from fmnist_jax import predict

    fit(Config(epochs=1, **TINY), data=tiny_dataset(), workdir=str(tmp_path / "w"))
    path = tmp_path / "input.png"
    make(path)
    code = predict.main([f"--workdir={tmp_path / 'w'}", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and message in one_line(err) and str(path) in err


def test_predict_names_the_flag_of_a_run_directory(tmp_path, capsys):
    """``fmnist-predict runs/cnn shoe.png``: the directory is named with its flag; a flag's
    own value is not taken for it."""
    from fmnist_jax import predict

    with pytest.raises(SystemExit) as exit_:
        predict.main([str(tmp_path), "shoe.png"])
    assert exit_.value.code == 2 and one_line(capsys.readouterr().err).endswith(
        f"required: --workdir (for a run's directory: --workdir={tmp_path})")
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--data_dir", str(tmp_path), "--test_index", "3"])
    assert exit_.value.code == 2 and one_line(capsys.readouterr().err).endswith(
        "required: --workdir (see --help)")


# ------------------------------------------------------------------ interrupts

def _signal_self_during(monkeypatch, target, name, signum=signal.SIGINT):
    original = getattr(target, name)

    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapped)


def _signal_in_a_gc_callback():
    def callback(phase, info):
        if phase == "start":
            gc.callbacks.remove(callback)
            signal.raise_signal(signal.SIGINT)  # runs the handler before it returns

    gc.callbacks.append(callback)
    gc.collect()


def _signal_in_a_weakref_callback():
    class Thing:
        pass

    thing = Thing()
    ref = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGINT))
    del thing  # the callback runs here
    assert ref() is None


@pytest.mark.parametrize("where", [_signal_in_a_gc_callback, _signal_in_a_weakref_callback])
def test_sigint_where_python_ignores_exceptions_still_interrupts(where):
    """Outside training a signal raises Interrupted at once; where Python prints and ignores
    exceptions (a garbage-collector callback, which JAX registers, a weak-reference
    callback), it is sent again and interrupts once that callback has returned. Before,
    the signal was lost: a Ctrl-C during a download did not stop it."""
    hook = sys.unraisablehook
    with StopSignal():
        with pytest.raises(Interrupted, match="SIGINT"):
            where()
            for _ in range(200):  # the signal comes back within 10 ms
                time.sleep(0.01)
    assert sys.unraisablehook is hook  # restored


def test_sigint_during_data_loading(monkeypatch, tmp_path, capsys, use_synthetic):
    from fmnist_jax import build

    _signal_self_during(monkeypatch, build, "load_dataset")
    code, err = run_main(capsys, f"--workdir={tmp_path}", f"--validation_size={SYNTHETIC_VAL}")
    assert code == 130 and "interrupted by SIGINT outside the training loop" in err
    assert not (tmp_path / "checkpoints").exists() or not any(
        (tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("where", ["evaluation", "saving"])
def test_sigterm_during_evaluation_or_saving(where, monkeypatch, tmp_path):
    from fmnist_jax import input_pipeline

    if where == "evaluation":
        _signal_self_during(monkeypatch, input_pipeline.DeviceResident, "evaluate",
                            signal.SIGTERM)
    else:  # from Orbax's commit thread, while epoch 1's checkpoint is being written
        original = ocp.handlers.JsonCheckpointHandler._save_fn
        sent = []

        async def save_fn(self, x, directory):  # called for both JSON items: signal once
            if "16.orbax-checkpoint-tmp" in str(directory) and not sent:
                sent.append(os.kill(os.getpid(), signal.SIGTERM))
            return await original(self, x, directory)

        monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", save_fn)
    with pytest.raises(train.Preempted, match="checkpoint saved in") as e:
        fit(Config(epochs=3, **TINY), data=tiny_dataset(), workdir=str(tmp_path))
    assert e.value.exit_code == 128 + signal.SIGTERM
    monkeypatch.undo()
    # The save that was in progress completed, and the run stopped at the next dispatch
    # boundary at the latest (5 steps into epoch 2), with a checkpoint there; it resumes to
    # the same end as a run never interrupted.
    assert Checkpoints(tmp_path).steps() in ([16], [16, 21])
    resumed = fit(Config(epochs=3, **TINY), data=tiny_dataset(), workdir=str(tmp_path))
    whole = fit(Config(epochs=3, **TINY), data=tiny_dataset())
    assert resumed.summary["test_loss"] == whole.summary["test_loss"]


def test_sigint_during_final_test_evaluation(monkeypatch, tmp_path, capsys, use_synthetic):
    from fmnist_jax import input_pipeline

    original = input_pipeline.DeviceResident.evaluate

    def evaluate(self, variables, split, steps, monitor=False):
        if split == "test":
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, variables, split, steps, monitor)

    monkeypatch.setattr(input_pipeline.DeviceResident, "evaluate", evaluate)
    code, err = run_main(capsys, "--model=mlp", "--epochs=1", f"--workdir={tmp_path}",
                         f"--validation_size={SYNTHETIC_VAL}", "--noprogress")
    assert code == 130
    assert f"the checkpoints in {tmp_path} are complete" in err
    assert Checkpoints(tmp_path).steps() == [(SYNTHETIC_TRAIN - SYNTHETIC_VAL) // 128]


@pytest.mark.parametrize("signals", [1, 2])
def test_interrupts_during_fit_raise_keyboard_interrupt_and_restore_handlers(
        signals, monkeypatch, tmp_path):
    """In a process fit does not own (a notebook, a script): one SIGINT during training
    saves a checkpoint at the next dispatch boundary and raises KeyboardInterrupt
    (Preempted); a second one raises KeyboardInterrupt (Interrupted) at once, never ending
    the process. The caller's signal handlers are back when fit returns."""
    from fmnist_jax import input_pipeline

    original = input_pipeline.DeviceResident.train_epoch

    def train_epoch(self, *args, **kwargs):
        for i, out in enumerate(original(self, *args, **kwargs)):
            if i == 1:  # the second dispatch of the first epoch
                for _ in range(signals):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.05)  # the handler runs
            yield out

    monkeypatch.setattr(input_pipeline.DeviceResident, "train_epoch", train_epoch)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as e:
        fit(Config(epochs=2, **TINY), data=tiny_dataset(), workdir=str(tmp_path))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    if signals == 1:
        assert isinstance(e.value, train.Preempted) and e.value.exit_code == 130
        assert Checkpoints(tmp_path).steps() == [10]  # the boundary after the signal
    else:
        assert isinstance(e.value, Interrupted) and e.value.during_training
        assert Checkpoints(tmp_path).steps() == []
