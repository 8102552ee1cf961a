"""evaluate and predict, as libraries and as commands, on a small model trained here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import (SYNTHETIC_TEST, SYNTHETIC_VAL, read_one_line_then_close,
                      run_synthetic, synthetic_cmd)
from PIL import Image

from fmnist_jax.data import CLASS_NAMES
from fmnist_jax.errors import UserError
from fmnist_jax.files import read_jsonl
from fmnist_jax.predict import image_to_input, load_model, predict


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    """A small CNN trained on the generated set through the command line, with label
    smoothing (its training loss is not the evaluation loss) and early stopping whose best
    epoch is not the last: the run's model is neither the latest nor an unsmoothed one."""
    workdir = tmp_path_factory.mktemp("trained")
    done = run_synthetic(synthetic_dir, "fmnist_jax.train", "--features=8", "--dense=16",
                         "--epochs=6", "--patience=2", "--label_smoothing=0.2",
                         "--learning_rate=0.03", "--schedule=constant", "--noprogress",
                         f"--validation_size={SYNTHETIC_VAL}", f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr
    return workdir, json.loads((workdir / "summary.json").read_text())


def test_evaluate_reproduces_the_summary(trained, synthetic_dir):
    workdir, summary = trained
    history = read_jsonl(workdir / "metrics.jsonl")
    assert summary["checkpoint_step"] == history[summary["best_epoch"] - 1]["step"]
    done = run_synthetic(synthetic_dir, "fmnist_jax.evaluate", f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr
    report = json.loads((workdir / "eval.json").read_text())
    assert report["checkpoint_step"] == summary["checkpoint_step"]
    assert (report["test_loss"], report["test_accuracy"], report["test_count"]) == (
        summary["test_loss"], summary["test_accuracy"], summary["test_count"])  # exactly
    assert f"the run's model (step {summary['checkpoint_step']}, as in summary.json)" in \
        done.stdout
    assert f"accuracy {100 * summary['test_accuracy']:.2f}% of {SYNTHETIC_TEST}" in done.stdout
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == SYNTHETIC_TEST
    assert np.trace(matrix) == round(report["test_accuracy"] * SYNTHETIC_TEST)
    assert "confusion matrix (rows: true class" in done.stdout and "Ankle b" in done.stdout
    png = Image.open(workdir / "confusion_matrix.png")
    assert png.format == "PNG" and png.size == (800, 700)


def test_evaluate_other_checkpoints_only_when_asked(trained, synthetic_dir):
    workdir, summary = trained
    last = summary["steps"]
    assert last > summary["checkpoint_step"]
    done = run_synthetic(synthetic_dir, "fmnist_jax.evaluate", f"--workdir={workdir}",
                         f"--step={last}")
    assert done.returncode == 0, done.stderr
    assert f"the checkpoint of step {last} (asked for)" in done.stdout
    assert json.loads((workdir / "eval.json").read_text())["checkpoint_step"] == last
    done = run_synthetic(synthetic_dir, "fmnist_jax.evaluate", f"--workdir={workdir}",
                         "--best")
    assert "the best checkpoint by val_accuracy (step" in done.stdout


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", f"fmnist_jax.{module}", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_evaluate_errors(tmp_path):
    done = _run("evaluate", f"--workdir={tmp_path}/nope")
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    done = _run("evaluate", f"--workdir={tmp_path}")
    assert done.returncode == 2 and "holds no config.json" in done.stderr


def test_load_model_and_predict(trained, use_synthetic):
    workdir, summary = trained
    from fmnist_jax.data import load_dataset

    test = load_dataset(validation_size=0).test
    model = load_model(workdir)
    assert model.step == summary["checkpoint_step"]
    probs = predict(model, test.images)
    assert probs.shape == (SYNTHETIC_TEST, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs.argmax(1) == test.labels).mean() == summary["test_accuracy"]
    assert load_model(workdir, step=summary["steps"]).step == summary["steps"]
    with pytest.raises(UserError, match="--step=5 is not in"):
        load_model(workdir, step=5)


def test_predict_cli_on_files_and_test_images(trained, synthetic_dir, use_synthetic,
                                              tmp_path):
    workdir, _ = trained
    from fmnist_jax.data import load_dataset

    test = load_dataset(validation_size=0).test
    # Test image 0 as a 28x28 PNG, and test image 1 as an RGB "product photo": dark on
    # white, 3x larger, JPEG.
    Image.fromarray(test.images[0, ..., 0]).save(tmp_path / "first.png")
    photo = 255 - np.kron(test.images[1, ..., 0], np.ones((3, 3), np.uint8))
    Image.fromarray(np.repeat(photo[..., None], 3, -1)).save(tmp_path / "photo.jpg",
                                                              quality=95)
    converted = image_to_input(tmp_path / "photo.jpg").astype(float)
    assert np.abs(converted - test.images[1, ..., 0]).mean() < 10  # back to the original
    done = run_synthetic(synthetic_dir, "fmnist_jax.predict", f"--workdir={workdir}",
                         "--test_index=0", "--test_index=1", tmp_path / "first.png",
                         tmp_path / "photo.jpg")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    first, second = (CLASS_NAMES[k] for k in test.labels[:2])
    assert lines[0].startswith(f"{tmp_path / 'first.png'}: {first} ")
    assert lines[1].startswith(f"{tmp_path / 'photo.jpg'}: {second} ")
    assert lines[2].startswith(f"test[0]: {first} ") and lines[2].endswith(f"(true: {first})")
    assert f"test[1]: {second}" in lines[3]


def test_predict_into_a_closed_pipe_stops_quietly(trained, synthetic_dir):
    """``fmnist-predict ... | head -1``: more output than a pipe holds (150 kB), and the
    reader gone after the first line."""
    workdir, _ = trained
    line, code, err = read_one_line_then_close(synthetic_cmd(
        synthetic_dir, "fmnist_jax.predict", f"--workdir={workdir}", "--top=10",
        *(f"--test_index={i}" for i in range(1000))))
    assert line.startswith("test[0]: ")
    assert code == 128 + signal.SIGPIPE
    assert err == ""  # as a Unix tool: the reader has what it wanted


def test_image_conversion_rules(tmp_path):
    img = np.zeros((28, 28), np.uint8)
    img[10:20, 5:25] = 200
    Image.fromarray(img).save(tmp_path / "a.png")
    np.testing.assert_array_equal(image_to_input(tmp_path / "a.png"), img)  # unchanged
    Image.fromarray(255 - img).save(tmp_path / "b.png")  # light background: inverted
    np.testing.assert_array_equal(image_to_input(tmp_path / "b.png"), img)
    rgba = np.zeros((56, 28, 4), np.uint8)  # transparent, tall: white, inverted, padded
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    out = image_to_input(tmp_path / "c.png")
    assert out.shape == (28, 28) and out.max() == 0


def test_export_runs_with_plain_jax_and_reproduces_the_test_accuracy(trained, synthetic_dir,
                                                                      use_synthetic, tmp_path):
    """fmnist-export for cpu, cuda and tpu; the artifact, loaded by a Python that never
    imports fmnist_jax, gives the run's test accuracy on the CPU, for any batch size."""
    workdir, summary = trained
    from fmnist_jax.data import load_dataset

    test = load_dataset(validation_size=0).test
    np.save(tmp_path / "images.npy", test.images)
    np.save(tmp_path / "labels.npy", test.labels)
    done = run_synthetic(synthetic_dir, "fmnist_jax.export", f"--workdir={workdir}",
                         f"--output={tmp_path / 'model.jax'}")
    assert done.returncode == 0, done.stderr
    assert f"the run's model (step {summary['checkpoint_step']}" in done.stdout
    assert "for cpu, cuda, tpu" in done.stdout
    code = (
        "import sys, jax, numpy as np\n"
        "d = sys.argv[1]\n"
        "exp = jax.export.deserialize(open(d + '/model.jax', 'rb').read())\n"
        "x, y = np.load(d + '/images.npy'), np.load(d + '/labels.npy')\n"
        "whole = np.asarray(exp.call(x)); part = np.asarray(exp.call(x[:37]))\n"
        "print(exp.platforms, exp.in_avals, exp.out_avals, whole.dtype, whole.shape,\n"
        "      np.abs(part - whole[:37]).max(), (whole.argmax(-1) == y).mean(),\n"
        "      'fmnist_jax' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert "('cpu', 'cuda', 'tpu')" in out.stdout and "uint8[n,28,28,1]" in out.stdout
    assert "float32[n,10]" in out.stdout and f"({SYNTHETIC_TEST}, 10)" in out.stdout
    assert float(words[-3]) < 1e-4  # 37 images alone: the same logits, within rounding
    assert float(words[-2]) == summary["test_accuracy"] and words[-1] == "False"


def test_export_errors(trained, tmp_path):
    workdir, _ = trained
    done = _run("export", f"--workdir={workdir}", "--platforms=cpu,vulkan")
    assert done.returncode == 2 and "--platforms=cpu,vulkan: give some of" in done.stderr
