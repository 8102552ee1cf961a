"""The README and CONTRIBUTING stay true: their links resolve, the sections they name exist,
and every flag they mention is a flag of one of the commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "CONTRIBUTING.md", "experiments/README.md"]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _command_flags() -> set[str]:
    from fmnist_jax import evaluate, predict
    from fmnist_jax.cli import build_parser

    parsers = [build_parser(), build_parser(evaluate.EvalConfig, presets=False),
               predict._parser()]
    flags = {option for p in parsers for action in p._actions for option in action.option_strings}
    for script in ("benchmark.py", "bench_devices.py", "optimizer_study.py"):
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
