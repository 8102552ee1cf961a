"""The README and CONTRIBUTING stay true: their links resolve, the sections they name exist,
and every flag they mention is a flag of one of the commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "CONTRIBUTING.md", "experiments/README.md"]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _command_flags() -> set[str]:
    from fmnist_jax import evaluate, export, predict
    from fmnist_jax.cli import build_parser

    parsers = [build_parser(), build_parser(evaluate.EvalConfig, presets=False),
               build_parser(export.ExportConfig, presets=False), predict._parser()]
    flags = {option for p in parsers for action in p._actions for option in action.option_strings}
    for script in ("benchmark.py", "bench_devices.py", "optimizer_study.py", "tuning.py",
                   "ablation.py", "ensemble.py"):
        usage = subprocess.run([sys.executable, str(REPO / "experiments" / script), "--help"],
                               capture_output=True, text=True, check=True).stdout
        flags |= set(re.findall(r"--\w+", usage))
    return flags | OTHER_TOOLS


OTHER_TOOLS = {"--logdir"}  # tensorboard's


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    path = REPO / doc
    text = path.read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        if file:
            assert (path.parent / file).exists(), f"{doc}: link to missing {file}"
        elif anchor:
            assert anchor in anchors, f"{doc}: no section for #{anchor}"


@pytest.mark.parametrize("doc", DOCS)
def test_sections_named_exist(doc):
    text = (REPO / doc).read_text()
    # "see Data" without a link is how references to deleted sections went unnoticed.
    unlinked = re.findall(r"\bsee ([A-Z][a-z]+(?: [a-z]+)*)(?!\]|\w)", text)
    assert not unlinked, f"{doc}: link these section references: {unlinked}"


def test_every_flag_mentioned_exists():
    flags = _command_flags()
    for doc in DOCS:
        text = (REPO / doc).read_text()
        mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", text))
        unknown = sorted(f for f in mentioned if f not in flags)
        assert not unknown, f"{doc} mentions flags no command has: {unknown}"


def _python_blocks(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_readme_library_models_train_to_their_accuracies(real_data_dir, monkeypatch):
    """README "As a library": the tutorial CNN, the nnx.Sequential MLP and the Linen CNN,
    run as written there (one epoch each on the real data, adamw 1e-3)."""
    monkeypatch.setenv("FMNIST_DATA_DIR", str(real_data_dir))
    blocks = _python_blocks("As a library")
    namespace: dict = {}
    for block in blocks[1:3]:  # the first one trains the named MLP for 5 epochs
        exec(block, namespace)  # noqa: S102
    results, test = namespace["results"], namespace["test"]
    floors = {"tutorial_cnn": 0.86, "sequential_mlp": 0.83, "linen_cnn": 0.86}
    for name, result in results.items():
        summary = result.summary
        assert summary["test_accuracy"] >= floors[name], (name, summary["test_accuracy"])
        assert summary["model"] == type(namespace["models"][name]).__name__
        assert summary["optimizer"] == "custom" and summary["epochs"] == 1
        predicted = result.predict(test.images).argmax(-1)  # raw uint8 images
        assert (predicted == test.labels).mean() == summary["test_accuracy"]  # exactly
    assert namespace["probabilities"].shape == (5, 10)
    # The modules passed to fit hold the run's model, in eval mode.
    from fmnist_jax.steps import normalize

    tutorial = namespace["models"]["tutorial_cnn"]
    assert tutorial.dropout1.deterministic and tutorial.batch_norm1.use_running_average
    logits = tutorial(normalize(test.images[:500]))
    np.testing.assert_allclose(logits, results["tutorial_cnn"].classifier.logits(
        test.images[:500]), rtol=1e-4, atol=1e-4)


def test_readme_own_data_block_runs_as_written(capsys):
    """README "Your own data": arrays of another shape and class count, a callback that
    stops training, gradient accumulation; no Fashion-MNIST needed."""
    block = _python_blocks("As a library")[3]
    namespace: dict = {}
    exec(block, namespace)  # noqa: S102
    result = namespace["result"]
    assert result.spec.image_shape == (32, 32, 3) and result.spec.num_classes == 3
    assert result.summary["stopped_by"] == "GoodEnough.on_epoch_end: 99% on validation"
    assert result.summary["epochs"] < 10 and result.summary["test_accuracy"] >= 0.99
    assert int(result.state.step) == 4 * result.summary["epochs"] * (2500 // 64)
    assert "epoch 1: val_accuracy" in capsys.readouterr().out


def _quick_start_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    body = text.split("## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S)
            for line in block.splitlines() if line.strip()]


def test_quick_start_commands_run(synthetic_dir, tmp_path):
    """Every training command of the README's quick start (`make train` is the command its
    comment names) runs as written, for one epoch on the generated data set; the set-up
    lines are the Makefile's and pip's. A new line there needs a case here."""
    from conftest import SYNTHETIC_VAL, run_synthetic

    setup = {"make test", "make test-newest",
             "python -m venv .venv && .venv/bin/pip install -e ."}
    commands = []
    for line in _quick_start_lines():
        if "fmnist_jax.train" in line:
            commands.append(line.split("fmnist_jax.train", 1)[1].split("#")[0].split())
        else:
            assert line.split("#")[0].strip() in setup, line
    assert len(commands) == 4, commands
    for i, args in enumerate(commands):
        workdir = tmp_path / f"run{i}"
        done = run_synthetic(synthetic_dir, "fmnist_jax.train", *args, "--epochs=1",
                             f"--validation_size={SYNTHETIC_VAL}", "--noprogress",
                             "--plots=false", f"--workdir={workdir}")
        assert done.returncode == 0, (args, done.stderr[-2000:])
        assert "test: loss" in done.stdout and (workdir / "summary.json").is_file(), args
