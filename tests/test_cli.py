"""The command line, end to end in subprocesses, and its generated flags."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from conftest import SYNTHETIC_TEST, SYNTHETIC_VAL, run_synthetic

from fmnist_jax.cli import build_parser, parse_config
from fmnist_jax.config import PRESETS, Config, preset
from fmnist_jax.errors import UserError


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
    assert set(PRESETS) >= {"cnn", "mlp", "mlp_seed", "cnn_seed", "cnn_wide", "best_cpu",
                            "best_cpu_long", "resnet"}


def test_tta_shift_is_a_radius_and_its_bare_flag_one_pixel():
    """--tta_shift takes the translations' radius in pixels; the bare flag (as before it
    took one) is 1 and --notta_shift is 0; a config.json of a run that stored it as true or
    false reads as 1 or 0."""
    assert parse_config([]).tta_shift == 0
    assert parse_config(["--tta_shift"]).tta_shift == 1
    assert parse_config(["--tta_shift=2"]).tta_shift == 2
    assert parse_config(["--preset=best_cpu", "--notta_shift"]).tta_shift == 0
    with pytest.raises(UserError, match=r"--tta_shift must be 0 to 14 pixels \(got "
                                        r"tta_shift=15\)"):
        parse_config(["--tta_shift=15"])
    old = {**Config().to_dict(), "tta_shift": True}
    assert Config.from_dict(old).tta_shift == 1 and type(Config.from_dict(old).tta_shift) is int


@pytest.mark.parametrize("name, params", [("cnn", 390_858), ("cnn_wide", 876_586),
                                          ("cnn_seed", 1_199_882), ("mlp_seed", 266_610),
                                          ("best_cpu", 390_858), ("best_cpu_long", 876_586),
                                          ("resnet", 2_777_610)])
def test_presets_are_valid_and_build_their_models(name, params):
    from flax import nnx

    from fmnist_jax.models import count_params, create_model

    c = preset(name).validate()
    assert count_params(create_model(c.model, rngs=nnx.Rngs(0), **c.model_kwargs())) == params


# What each preset trains, as measured in README and experiments/README.md: a change of a
# default (Config's or a model's) must not change a preset's recipe unnoticed.
RECIPES = {  # optimizer, peak lr, label smoothing, first dropout rate, epochs, batch
    "cnn": ("adam", 5e-3, 0.1, 0.1, 6, 128),
    "mlp": ("adam", 1e-3, 0.0, 0.2, 20, 128),
    "mlp_seed": ("sgd", 0.01, 0.0, 0.2, 30, 32),
    "cnn_seed": ("adadelta", 1.0, 0.0, 0.25, 12, 128),
    "cnn_wide": ("adam", 3e-3, 0.1, 0.3, 20, 128),
    "best_cpu": ("muon", 5e-3, 0.1, 0.1, 13, 128),
    "best_cpu_long": ("adam", 3e-3, 0.1, 0.3, 45, 128),
    "resnet": ("sgd", 0.1, 0.1, 0.0, 60, 128),
}


def test_presets_train_their_recipes():
    from flax import nnx

    from fmnist_jax.models import create_model

    assert set(RECIPES) == set(PRESETS)
    for name, recipe in RECIPES.items():
        c = preset(name)
        model = create_model(c.model, rngs=nnx.Rngs(0), **c.model_kwargs())
        dropout = next(m.rate for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout))
        assert (c.optimizer, c.learning_rate, c.label_smoothing, dropout, c.epochs,
                c.batch_size) == recipe, name
    assert preset("cnn") == Config()  # the default run is the cnn preset


def test_cli_trains_and_writes_its_files(synthetic_dir, tmp_path):
    result = run_synthetic(synthetic_dir, "fmnist_jax.train", "--model=mlp", "--epochs=1",
                           f"--workdir={tmp_path}", f"--validation_size={SYNTHETIC_VAL}",
                           "--noprogress")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert f"test: loss {summary['test_loss']:.4f}, accuracy " \
           f"{100 * summary['test_accuracy']:.2f}% ({SYNTHETIC_TEST} images)" in result.stdout
    assert summary["test_accuracy"] > 0.9  # the generated classes are easy
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    for name in ("config.json", "metrics.jsonl", "summary.json", "confusion_matrix.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name  # umask 022


def test_files_follow_the_umask(tmp_path):
    """Under umask 022 every file of a run is 0644; under 077 only its owner reads it."""
    from conftest import tiny_dataset

    from fmnist_jax import Config, fit

    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            workdir = tmp_path / f"u{umask:o}"
            fit(Config(model="mlp", epochs=1, progress=False, tensorboard=True),
                data=tiny_dataset(), workdir=str(workdir))
        finally:
            os.umask(old)
        written = [p for p in workdir.rglob("*") if p.is_file() and p.name != ".lock"
                   and "checkpoints" not in p.parts]
        assert {p.name for p in written} >= {"config.json", "metrics.jsonl", "summary.json",
                                             "learning_curves.png"}
        for p in written:
            assert p.stat().st_mode & 0o777 == mode, (p, oct(p.stat().st_mode))


def test_bad_value_in_a_subprocess():
    """The one-line error, end to end (every other bad flag: tests/test_faults.py)."""
    result = run_cli("--learning_rate=-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("fmnist-train: error: --learning_rate must be positive "
                                     "(got learning_rate=-1.0)")


def test_process_tuning_registers_its_listener_once():
    """``main`` may run many times in one process (tests, a notebook): the heap-trim
    listener is registered once."""
    code = ("from jax._src import monitoring as m; from fmnist_jax.tuning import "
            "tune_command_line as t; n = len(m.get_event_duration_listeners()); "
            "t(False); t(False); t(True); print(len(m.get_event_duration_listeners()) - n)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split()[-1] == "1"
