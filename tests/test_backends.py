"""Every backend from one source, proven without the hardware: the train and eval steps of
every model lowered for cpu, cuda and tpu (jax.export works on a CPU-only machine), and
nothing global changed by importing or running the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CONV_MODELS = ("cnn", "cnn_seed", "resnet")


@pytest.fixture(scope="module")
def lowered(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("lowering") / "report.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, str(HERE / "lowering_run.py"), str(path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(path.read_text())


def test_every_model_lowers_everywhere(lowered):
    combos = {(r["model"], r["dtype"], r["platform"], r["devices"]) for r in lowered}
    assert len(combos) == 4 * 2 * 3 * 2  # models, dtypes, platforms, 1 and 8 devices
    for r in lowered:
        assert r["logits"] == "float32[2,64,10]", r
        if r["devices"] == 8:
            assert r["train"]["sharded"], r  # the mesh's shardings are in the program


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerators_get_native_convolutions_and_pooling(lowered, platform):
    for r in (r for r in lowered if r["platform"] == platform):
        for fn in ("train", "eval"):  # no im2col on an accelerator
            assert r[fn]["patch_stacks"] == 0, r
        if r["model"] in CONV_MODELS:
            # Forward, input and kernel gradients: XLA's convolution, and reduce_window.
            assert r["train"]["convolutions"] >= 5 and r["eval"]["convolutions"] >= 2, r
            assert r["train"]["reduce_window"] >= 1, r


def test_the_cpu_gets_im2col(lowered):
    """Patches from stacked slices, one stack per 3x3 convolution in the forward pass: the
    seed CNN's two (VALID), our CNN's three (SAME), at least the ResNet's stem and block."""
    expected = {"cnn_seed": 2, "cnn": 3}
    for r in (r for r in lowered if r["platform"] == "cpu" and r["model"] in CONV_MODELS):
        for fn in ("train", "eval"):
            stacks = r[fn]["patch_stacks"]
            if r["model"] in expected:
                assert stacks == expected[r["model"]], r
            else:
                assert stacks >= 3, r
        assert r["eval"]["convolutions"] == 0 and r["train"]["reduce_window"] == 0, r


def test_only_the_cpu_recomputes_the_resnets_blocks(lowered):
    """jax.checkpoint around each residual block (2 here) on a CPU; GPUs and TPUs keep the
    activations, and no other model recomputes anything. Other barriers are not
    recomputations: the seed CNN's conv2 builds its large patches once in float32
    (kernels._im2col_fwd; 42 MB at batch 64, half that in bfloat16, below
    kernels._LARGE_PATCHES_BYTES), and under bfloat16 each convolution's kernel gradient
    transposes its patches first (kernels._grad_kernel): 3 convolutions in our CNN, 2 in
    the seed CNN, 5 in this ResNet."""
    convolutions = {"mlp": 0, "cnn": 3, "cnn_seed": 2, "resnet": 5}
    for r in lowered:
        bfloat16 = r["dtype"] == "bfloat16"
        cpu = ({"resnet": 2, "cnn_seed": int(not bfloat16)}.get(r["model"], 0)
               + bfloat16 * convolutions[r["model"]])
        assert r["train"]["barriers"] == (cpu if r["platform"] == "cpu" else 0), r
        assert r["eval"]["barriers"] == 0, r


def test_every_convolution_and_matmul_computes_in_the_runs_dtype(lowered):
    """Under bfloat16 every convolution and dot_general of the train and eval steps, on
    every platform, has bfloat16 operands (float32 ones under float32), and every one of
    them was seen."""
    for r in lowered:
        operands = "bf16/bf16" if r["dtype"] == "bfloat16" else "f32/f32"
        for fn in ("train", "eval"):
            counted = r[fn]["convolutions"] + r[fn]["matmuls"]
            assert counted > 0 and r[fn]["typed_operations"] == counted, r
            assert r[fn]["operand_types"] == [operands], (r["model"], r["platform"], fn, r[fn])


def test_bfloat16_keeps_parameters_and_optimizer_state_float32(lowered):
    for r in lowered:
        assert "bfloat16" not in r["state_dtypes"] and "float32" in r["state_dtypes"], r


def test_importing_and_running_change_nothing_global(tmp_path):
    """import fmnist_jax leaves os.environ, JAX's lowering of random bits, JAX's settings
    and monitoring listeners, the absl log's filters, matplotlib's backend and the signal
    handlers as they were; so does a whole fit() with a workdir and plots."""
    code = f"""
import os, signal, logging, jax, matplotlib
sys_path = {str(HERE)!r}
import sys; sys.path.insert(0, sys_path)

def snapshot():
    key = jax.random.key(0)
    text = jax.jit(lambda k: jax.random.bits(k, (4,))).lower(key).as_text()
    from jax._src import monitoring
    return (dict(os.environ), "while" in text, jax.config.jax_compilation_cache_dir,
            len(monitoring.get_event_duration_listeners()),
            jax.config.jax_debug_nans, list(logging.getLogger("absl").filters),
            matplotlib.get_backend(), signal.getsignal(signal.SIGINT),
            signal.getsignal(signal.SIGTERM))

before = snapshot()
import fmnist_jax, fmnist_jax.train, fmnist_jax.export, fmnist_jax.evaluate
after_import = snapshot()
from conftest import tiny_dataset
fmnist_jax.fit(fmnist_jax.Config(model="cnn", features=(4,), dense=8, epochs=1,
                                 progress=False), data=tiny_dataset(),
               workdir={str(tmp_path / 'w')!r})
after_fit = snapshot()
print(before[1], before == after_import, before == after_fit)
print([i for i, (a, b) in enumerate(zip(before, after_fit)) if a != b])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    verdict, changed = done.stdout.strip().splitlines()[-2:]
    assert verdict == "True True True" and changed == "[]", done.stdout  # JAX's loop kept
