"""experiments/colab_tpu.ipynb runs, on a CPU with a tiny configuration."""

from __future__ import annotations

import dataclasses
import json
import os
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


@pytest.mark.skipif(not os.environ.get("FMNIST_TEST_COLAB_INSTALL"),
                    reason="installs a runtime from the registry: `make test-newest` runs it")
def test_notebook_installs_itself_as_on_colab(tmp_path, monkeypatch):
    """The notebook as a Colab user runs it: a kernel whose environment has this jax and
    jaxlib but not fmnist_jax, and an install cell that installs this repository (its
    committed HEAD) from its git URL, keeping that jax and jaxlib."""
    import importlib.metadata
    import subprocess
    import sys

    runtime, kernels = tmp_path / "runtime", tmp_path / "jupyter"
    subprocess.run([sys.executable, "-m", "venv", str(runtime)], check=True)
    python = str(runtime / "bin" / "python")
    keep = [f"{name}=={importlib.metadata.version(name)}" for name in ("jax", "jaxlib")]
    subprocess.run([python, "-m", "pip", "install", "-q", *keep, "ipykernel"], check=True)
    subprocess.run([python, "-m", "ipykernel", "install", "--prefix", str(kernels),
                    "--name", "colab-runtime"], check=True, capture_output=True)
    monkeypatch.setenv("JUPYTER_PATH", str(kernels / "share" / "jupyter"))
    data = tmp_path / "data"
    files = write_idx_set(data, n_train=7000, n_test=1000)
    (data / "spec.json").write_text(json.dumps([dataclasses.asdict(f) for f in files.all()]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = (f'REPO_URL = "file://{NOTEBOOK.parents[1]}"\nMODEL = "mlp"\nEPOCHS = 1\n'
                   f'BATCH_SIZE = 256\nLEARNING_RATE = 3e-3\nDTYPE = ""\n'
                   f'WORKDIR = "{tmp_path}/run"\nALLOW_CPU = True\n')
    install = nb.cells.index(next(c for c in nb.cells if "pip" in c.source))
    nb.cells.insert(install + 1, nbformat.v4.new_code_cell(  # the generated data set
        f'import sys; sys.path.insert(0, "{Path(__file__).parent}")\n'
        f'import synthetic; synthetic.use("{data}")'))
    nbclient.NotebookClient(nb, timeout=900, kernel_name="colab-runtime",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
    for name, version in (k.split("==") for k in keep):
        assert f"{name} {version}\n" in texts, texts  # the runtime's own, kept
    assert "fmnist_jax 0.1.0" in texts, texts
    installed = subprocess.run([python, "-m", "pip", "show", "fmnist_jax"], check=True,
                               capture_output=True, text=True).stdout
    assert "site-packages" in installed  # installed from the git URL, not this checkout
    assert (tmp_path / "run" / "summary.json").is_file()


def test_interrupting_fit_in_a_kernel_raises_keyboard_interrupt_and_the_kernel_lives(
        tmp_path):
    """A real Jupyter kernel: fit interrupted once (a checkpoint, then KeyboardInterrupt),
    and again interrupted twice; each time the cell ends with a KeyboardInterrupt, the
    kernel lives on, and the next cell runs with the kernel's own SIGINT handler."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")

    def run(code: str, interrupts: int = 0, timeout: float = 300) -> tuple[dict, str]:
        msg_id, text, sent = kc.execute(code), "", 0
        while True:
            msg = kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            text += msg["content"].get("text", "")
            if sent < interrupts and ("epoch   2/" in text if sent == 0 else
                                      "SIGINT: saving a checkpoint" in text):
                km.interrupt_kernel()
                sent += 1
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return kc.get_shell_msg(timeout=timeout)["content"], text

    try:
        reply, _ = run(f'import sys, signal; sys.path.insert(0, "{Path(__file__).parent}")\n'
                       "from conftest import tiny_dataset\n"
                       "from fmnist_jax import Config, fit\n"
                       "handler = signal.getsignal(signal.SIGINT)")
        assert reply["status"] == "ok", reply
        for interrupts in (1, 2):
            reply, text = run(
                'fit(Config(model="mlp", epochs=500, batch_size=32, steps_per_dispatch=1, '
                f'progress=False), data=tiny_dataset(), workdir="{tmp_path}/w{interrupts}")',
                interrupts)
            assert reply["status"] == "error", text
            assert reply["ename"] in ("Preempted", "Interrupted"), reply
            if interrupts == 1:
                assert reply["ename"] == "Preempted" and "checkpoint saved in" in \
                    reply["evalue"], reply
            reply, text = run("print(signal.getsignal(signal.SIGINT) is handler, 6 * 7)")
            assert reply["status"] == "ok" and "True 42" in text, (reply, text)
        assert km.is_alive()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
