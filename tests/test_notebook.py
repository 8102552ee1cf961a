"""experiments/colab_tpu.ipynb runs, on a CPU with a tiny configuration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import write_idx_set

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "colab_tpu.ipynb"


def _run(parameters: str, tmp_path: Path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = parameters
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb


def test_notebook_trains_and_shows_curves_and_predictions(tmp_path):
    # A generated set with room for the default 5,000 validation images (tests/synthetic.py).
    data = tmp_path / "data"
    files = write_idx_set(data, n_train=7000, n_test=1000)
    (data / "spec.json").write_text(json.dumps([dataclasses.asdict(f) for f in files.all()]))
    nb = _run(f'import sys; sys.path.insert(0, "{Path(__file__).parent}")\n'
              f'import synthetic; synthetic.use("{data}")\n'
              f'REPO_URL = ""\nMODEL = "mlp"\nEPOCHS = 2\nBATCH_SIZE = 256\n'
              f'LEARNING_RATE = 3e-3\nDTYPE = "float32"\nWORKDIR = "{tmp_path}/run"\n'
              f'ALLOW_CPU = True\n', tmp_path)
    texts = [o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
             for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("devices: [CpuDevice(id=0)]" in t for t in texts), texts
    import jax

    assert any(f"jax {jax.__version__}\n" in t for t in texts), texts  # versions printed
    assert any("batch 256 (256 per device), float32" in t for t in texts), texts
    summary = next(t for t in texts if "test_accuracy" in t)
    accuracy = float(summary.split("'test_accuracy': ")[1].split(",")[0])
    assert accuracy > 0.8  # the generated classes are easy
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 3  # learning curves, predictions, confusion matrix
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_notebook_stops_clearly_without_an_accelerator(tmp_path):
    with pytest.raises(nbclient.exceptions.CellExecutionError) as e:
        _run(f'REPO_URL = ""\nMODEL = "mlp"\nEPOCHS = 1\nBATCH_SIZE = 256\n'
             f'LEARNING_RATE = 3e-3\nDTYPE = "float32"\nWORKDIR = "{tmp_path}/run"\n'
             f'ALLOW_CPU = False\n', tmp_path)
    assert "This runtime has no TPU: JAX fell back to the CPU" in str(e.value)
    assert not (tmp_path / "run").exists()
