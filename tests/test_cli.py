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
    assert set(PRESETS) >= {"cnn", "mlp", "mlp_seed", "cnn_seed", "cnn_wide", "resnet"}


@pytest.mark.parametrize("name, params", [("cnn", 390_858), ("cnn_wide", 876_586),
                                          ("cnn_seed", 1_199_882), ("mlp_seed", 266_610),
                                          ("resnet", 2_777_610)])
def test_presets_are_valid_and_build_their_models(name, params):
    from flax import nnx

    from fmnist_jax.models import count_params, create_model

    c = preset(name).validate()
    assert count_params(create_model(c.model, rngs=nnx.Rngs(0), **c.model_kwargs())) == params


def test_cli_trains_and_writes_its_files(real_data_dir, tmp_path):
    result = run_cli("--model=mlp", "--epochs=1", f"--workdir={tmp_path}",
                     f"--data_dir={real_data_dir}", "--noprogress")
    assert result.returncode == 0, result.stderr
    assert "test: loss" in result.stdout and "accuracy" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.80  # 82.8% measured
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_bad_value_in_a_subprocess():
    """The one-line error, end to end (every other bad flag: tests/test_faults.py)."""
    result = run_cli("--learning_rate=-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("fmnist-train: error: --learning_rate must be positive "
                                     "(got learning_rate=-1.0)")
