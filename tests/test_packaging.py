"""The declared dependencies, resolved by pip for the Pythons this machine does not have
(3.12, 3.13: Colab's), pair only into versions the code supports. Needs the package
registry (as installing does); no Python 3.12 interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 26, 27, 28, 31, 34, 35, 39)]


def supported(jax: Version, flax: Version) -> bool:
    """flax and jax pairs that import (read in their sources, COMPAT.md): flax 0.12.8 needs
    jax < 0.11.1 (MutableHiType, HiPrimitive), 0.12.9 jax < 0.11.2 (HiPrimitive); 0.12.10
    and later pick HiPrim or VJPHiPrimitive, whichever jax has (jax >= 0.11.1)."""
    if flax >= Version("0.12.10"):
        return jax >= Version("0.11.1")
    if flax >= Version("0.12.9"):
        return Version("0.11.1") <= jax < Version("0.11.2")
    return jax < Version("0.11.1")


def _requirements(python: str) -> list[str]:
    """The project's dependencies whose markers hold on ``python``, tfds aside (its
    dependency ``promise`` has no wheel, and pip resolves for another Python from wheels
    only): tfds is resolved on its own."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = {"python_version": python, "python_full_version": f"{python}.0",
           "sys_platform": "linux", "platform_system": "Linux"}
    kept = []
    for text in project["dependencies"]:
        requirement = Requirement(text)
        if requirement.marker is None or Marker(str(requirement.marker)).evaluate(env):
            kept.append(str(requirement).split(";")[0])
    return kept


def _resolve(python: str, requirements: list[str], tmp_path: Path, deps: bool = True) -> dict:
    report = tmp_path / f"report-{python}-{deps}.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
               "--ignore-installed", "--only-binary=:all:", f"--python-version={python}",
               "--implementation=cp", *(f"--platform={p}" for p in PLATFORMS),
               "--platform=manylinux2014_x86_64", "--platform=any", f"--report={report}",
               *([] if deps else ["--no-deps"]), *requirements]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode and ("NewConnectionError" in done.stderr
                            or "Temporary failure in name resolution" in done.stderr):
        pytest.skip(f"the package registry cannot be reached: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return {item["metadata"]["name"].lower().replace("_", "-"): Version(
        item["metadata"]["version"]) for item in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("python", ["3.12", "3.13"])
def test_newest_releases_pair_into_a_supported_combination(python, tmp_path):
    requirements = _requirements(python)
    tfds = [r for r in requirements if r.startswith("tensorflow-datasets")]
    resolved = _resolve(python, [r for r in requirements if r not in tfds], tmp_path)
    resolved |= _resolve(python, tfds, tmp_path, deps=False)
    assert supported(resolved["jax"], resolved["flax"]), resolved
    assert resolved["jaxlib"] == resolved["jax"] or resolved["jaxlib"].release[:3] == \
        resolved["jax"].release[:3], resolved
    for name in ("optax", "orbax-checkpoint", "tensorflow-datasets", "grain",
                 "importlib-resources", "flatbuffers"):
        assert name in resolved, (name, resolved)


@pytest.mark.parametrize("python", ["3.12", "3.13"])
def test_the_flax_floor_pairs_into_a_supported_combination(python, tmp_path):
    """The lowest flax allowed there, with whatever jax pip then picks."""
    requirements = [r for r in _requirements(python) if not r.startswith(
        ("tensorflow-datasets", "flax"))]
    floor = next(Requirement(r) for r in _requirements(python) if r.startswith("flax"))
    lowest = min(s.version for s in floor.specifier if s.operator == ">=")
    resolved = _resolve(python, [*requirements, f"flax=={lowest}"], tmp_path)
    assert resolved["flax"] == Version(lowest) and supported(resolved["jax"],
                                                               resolved["flax"]), resolved


def test_the_markers_cover_every_python():
    """3.11 gets the flax it can import with jax 0.10.2; 3.12 and later the newer floor."""
    assert "flax<1,>=0.12.8" in _requirements("3.11")
    assert "flax<1,>=0.12.10" in _requirements("3.12")
    assert "importlib_resources>=6" in _requirements("3.13")  # tfds imports it everywhere
    assert not supported(Version("0.11.1"), Version("0.12.8"))  # the pair that broke
    assert not supported(Version("0.12.0.1"), Version("0.12.9"))
