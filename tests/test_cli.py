"""The command line, end to end in subprocesses, and its generated flags."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from fmnist_jax.cli import build_parser, parse_config
from fmnist_jax.config import PRESETS, Config, preset


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fmnist_jax.train", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_every_field_is_a_documented_flag():
    text = build_parser().format_help()
    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in text, f.name
    assert "--preset" in text and "(default: cnn)" in text


def test_parsing_types_and_presets():
    c = parse_config(["--model=mlp", "--hidden=64,32", "--noprogress", "--nesterov",
                      "--batch_norm=false", "--learning_rate", "0.5"])
    assert (c.model, c.hidden, c.progress, c.nesterov, c.batch_norm, c.learning_rate) == \
        ("mlp", (64, 32), False, True, False, 0.5)
    c = parse_config(["--preset=cnn_seed", "--epochs=3"])
    assert c == preset("cnn_seed", epochs=3)
    assert (c.optimizer, c.learning_rate, c.loss) == ("adadelta", 1.0, "categorical")
    assert set(PRESETS) >= {"cnn", "mlp", "mlp_seed", "cnn_seed"}


def test_cli_trains_and_writes_its_files(real_data_dir, tmp_path):
    result = run_cli("--model=mlp", "--epochs=1", f"--workdir={tmp_path}",
                     f"--data_dir={real_data_dir}", "--noprogress")
    assert result.returncode == 0, result.stderr
    assert "test: loss" in result.stdout and "accuracy" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.80  # 82.8% measured
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--model=resnet"], "argument --model: invalid choice: 'resnet'"),
    (["--learning_rate=-1"], "--learning_rate must be positive (got learning_rate=-1.0)"),
    (["--batch_size=0"], "--batch_size must be positive (got batch_size=0)"),
    (["--epochs=-2"], "--epochs must be 0 or more"),
    (["--epochs=two"], "argument --epochs: invalid int value: 'two'"),
    (["--optimizer=lbfgs"], "invalid choice: 'lbfgs'"),
    (["--bogus=1"], "unrecognized arguments: --bogus=1"),
])
def test_bad_flags_give_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_errors_that_need_the_data(real_data_dir, tmp_path):
    common = [f"--data_dir={real_data_dir}", f"--workdir={tmp_path}/w", "--noprogress"]
    for args, message in [
        (["--batch_size=60000"], "--batch_size=60000 must be between 1 and the 55000"),
        (["--validation_size=60000"], "--validation_size=60000 must be in [0, 60000)"),
    ]:
        result = run_cli(*common, *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_missing_data_and_bad_workdir(tmp_path):
    result = run_cli(f"--data_dir={tmp_path}", f"--workdir={tmp_path}/w")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--data_dir={tmp_path} lacks train-images-idx3-ubyte.gz" in result.stderr
    (tmp_path / "file").write_text("x")
    result = run_cli(f"--workdir={tmp_path}/file")
    assert result.returncode == 2 and "is a file; give a directory" in result.stderr
