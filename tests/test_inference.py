"""evaluate and predict, as libraries and as commands, on a small model trained here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fmnist_jax import Config, fit
from fmnist_jax.predict import image_to_input, load_model, predict


@pytest.fixture(scope="module")
def trained(real_data_dir, tmp_path_factory):
    """Two epochs of a small MLP on the real data (a few seconds)."""
    workdir = tmp_path_factory.mktemp("trained")
    config = Config(model="mlp", hidden=(128,), epochs=2, progress=False,
                    data_dir=str(real_data_dir))
    result = fit(config, workdir=str(workdir))
    return workdir, result


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", f"fmnist_jax.{module}", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_evaluate_end_to_end(trained, real_data_dir):
    workdir, result = trained
    done = _run("evaluate", f"--workdir={workdir}", f"--data_dir={real_data_dir}")
    assert done.returncode == 0, done.stderr
    report = json.loads((workdir / "eval.json").read_text())
    assert report["test_count"] == 10_000
    assert report["test_accuracy"] == pytest.approx(result.summary["test_accuracy"])
    assert report["test_loss"] == pytest.approx(result.summary["test_loss"], rel=1e-5)
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 10_000
    assert (matrix.sum(1) == 1000).all()  # 1,000 test images per class
    assert np.trace(matrix) == round(report["test_accuracy"] * 10_000)
    assert report["per_class_accuracy"]["Trouser"] > 0.9
    assert "confusion matrix (rows: true class" in done.stdout and "Ankle b" in done.stdout
    png = Image.open(workdir / "confusion_matrix.png")
    assert png.format == "PNG" and png.size == (800, 700)


def test_evaluate_errors(tmp_path):
    done = _run("evaluate", f"--workdir={tmp_path}/nope")
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    done = _run("evaluate", f"--workdir={tmp_path}")
    assert done.returncode == 2 and "no checkpoints in this workdir" in done.stderr


def test_predict_library_and_checkpoint_choice(trained, real_data_dir):
    workdir, result = trained
    model = load_model(workdir)
    from fmnist_jax.data import load_dataset
    test = load_dataset(str(real_data_dir), validation_size=0).test
    probs = predict(model, test.images[:500])
    assert probs.shape == (500, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs.argmax(1) == test.labels[:500]).mean() > 0.8
    assert load_model(workdir, "latest").step == 2 * 429
    assert load_model(workdir, 429).step == 429
    with pytest.raises(Exception, match="is not in"):
        load_model(workdir, 5)


def test_predict_cli_on_files_and_test_images(trained, real_data_dir, tmp_path):
    workdir, _ = trained
    from fmnist_jax.data import load_dataset
    test = load_dataset(str(real_data_dir), validation_size=0).test
    # Test image 0 (an ankle boot) as a 28x28 PNG, and test image 1 (a pullover) as an RGB
    # "product photo": dark on white, 3x larger, JPEG.
    Image.fromarray(test.images[0, ..., 0]).save(tmp_path / "boot.png")
    photo = 255 - np.kron(test.images[1, ..., 0], np.ones((3, 3), np.uint8))
    Image.fromarray(np.repeat(photo[..., None], 3, -1)).save(tmp_path / "photo.jpg",
                                                              quality=95)
    converted = image_to_input(tmp_path / "photo.jpg").astype(float)
    assert np.abs(converted - test.images[1, ..., 0]).mean() < 10  # back to the original
    done = _run("predict", f"--workdir={workdir}", f"--data_dir={real_data_dir}",
                "--test_index=0", "--test_index=1", tmp_path / "boot.png",
                tmp_path / "photo.jpg")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(f"{tmp_path / 'boot.png'}: Ankle boot ")
    assert lines[1].startswith(f"{tmp_path / 'photo.jpg'}: Pullover ")  # test[1]: pullover
    assert lines[2].startswith("test[0]: Ankle boot ") and lines[2].endswith(
        "(true: Ankle boot)")
    assert "test[1]: Pullover" in lines[3]


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
