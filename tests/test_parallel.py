"""Data parallelism on 8 simulated CPU devices against one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTHETIC_TEST, SYNTHETIC_VAL, synthetic_cmd

from fmnist_jax.files import read_jsonl

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = {}
    for n in (1, 8):
        path = tmp_path_factory.mktemp("devices") / f"{n}.json"
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        done = subprocess.run([sys.executable, str(HERE / "multidevice_run.py"), str(path)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        out[n] = json.loads(path.read_text())
    return out


def test_really_eight_devices(reports):
    assert reports[1]["devices"] == 1 and reports[8]["devices"] == 8
    assert reports[8]["summary"]["num_devices"] == 8
    assert len(reports[8]["summary"]["devices"]) == 8


def test_steps_and_evaluation_match_one_device(reports):
    a, b = (np.array(reports[n]["params_after_10_steps"]) for n in (1, 8))
    # Float rounding only: each kernel gradient sums N*H*W products, as 8 partial sums and an
    # all-reduce here against one matmul (5e-5 apart on a gradient of ~10, then 10 SGD
    # steps through batch norm). A missing or doubled all-reduce is off by 1e-2 or more.
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-4)
    assert reports[1]["eval"]["count"] == reports[8]["eval"]["count"] == SYNTHETIC_VAL
    assert reports[8]["eval"]["loss"] == pytest.approx(reports[1]["eval"]["loss"], rel=1e-3)
    assert abs(reports[8]["eval"]["accuracy"] - reports[1]["eval"]["accuracy"]) <= 0.002  # 1 image


def test_one_epoch_matches_one_device(reports):
    # Summing gradients over 8 devices changes the order of additions: parameters differ by
    # ~1e-7 after 200 steps (measured), until a ReLU whose input sits at 0 flips on one side
    # and not the other, and Adam turns noise in near-zero gradients into +-lr steps. From
    # then on the two runs are two equally good trainings: measured after one epoch, the
    # validation loss differed by 2.3%, train loss by 0.1%, accuracies by 0.6 points.
    # Step-level equality is test_steps_and_evaluation_match_one_device.
    for one, eight in zip(reports[1]["history"], reports[8]["history"]):
        for key in ("train_loss", "val_loss"):
            assert eight[key] == pytest.approx(one[key], rel=5e-2), key
        for key in ("train_accuracy", "val_accuracy"):
            assert eight[key] == pytest.approx(one[key], abs=0.015), key
    assert reports[8]["summary"]["test_accuracy"] == pytest.approx(
        reports[1]["summary"]["test_accuracy"], abs=0.01)


def test_every_image_evaluated_once_and_in_its_place(reports):
    # eval_batch_size=99 is rounded up to 104 on 8 devices; the last batch is padded.
    for n in (1, 8):
        assert reports[n]["summary"]["test_count"] == SYNTHETIC_TEST
        # Sharded over the devices in batches, or one image at a time on one device: the
        # same weights give each image the same logits (images and logits stay aligned).
        assert reports[n]["eval_vs_one_by_one"] < 1e-5


def test_nothing_recompiles_after_the_first_epoch(reports):
    for n in (1, 8):
        first, second = reports[n]["compiles_at_epoch_ends"][:2]
        assert second == first, f"{second - first} compilations in epoch 2 on {n} devices"


def test_batch_size_must_divide_over_the_devices(reports):
    assert "batch_error" not in reports[1]
    assert reports[8]["batch_error"] == (
        "--batch_size=100 does not divide over the 8 devices (cpu); use a multiple of 8, "
        "e.g. 96")


def _two_hosts(synthetic_dir, workdir, *args, env_of=lambda i: {}):
    """Runs the training command as 2 processes x 2 CPU devices joined by jax.distributed
    on this machine; returns [(returncode, stdout, stderr)] of both."""
    port = _free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(i), **env_of(i)}
        procs.append(subprocess.Popen(
            synthetic_cmd(synthetic_dir, "fmnist_jax.train", "--model=mlp", "--noprogress",
                          f"--validation_size={SYNTHETIC_VAL}", f"--workdir={workdir}",
                          *args), env=env, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outs)]


def test_two_hosts_on_one_machine(synthetic_dir, tmp_path):
    """The multi-host path: 2 processes x 2 CPU devices, joined by jax.distributed. JAX's
    persistent compilation cache stays off (with jax 0.12.1 a cross-process program read
    back from it hangs)."""
    cache = tmp_path / "cache"
    outs = _two_hosts(synthetic_dir, tmp_path, "--epochs=1",
                      env_of=lambda i: {"XDG_CACHE_HOME": str(cache)})
    assert [o[0] for o in outs] == [0, 0], outs[0][2][-2000:] + outs[1][2][-2000:]
    assert "epoch   1/1" in outs[0][1] and "test: loss" in outs[0][1]
    # Only process 0 prints (Gloo, the CPU collectives library, announces its connections
    # on both).
    assert "epoch" not in outs[1][1] and "test:" not in outs[1][1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["num_processes"], summary["num_devices"]) == (2, 4)
    assert summary["test_count"] == SYNTHETIC_TEST and summary["test_accuracy"] > 0.8
    assert (tmp_path / "checkpoints" / str(summary["steps"])).is_dir()
    assert (tmp_path / "confusion_matrix.png").is_file()  # plots from both hosts' logits
    assert not (cache / "fmnist_jax" / "jax").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_on_the_tfds_path_read_their_own_rows_and_evaluate_as_one(tmp_path):
    """tfds's pipeline on 4 devices in an interleaved mesh order, as 2 processes x 2
    devices (each holding two runs of rows of every batch) and as 1 process: each process
    reads only its own rows of every batch, the two together every row once; the test
    split's logits are the one process's exactly, each in its place; an epoch of training
    gives the same losses, and logits after it, within float rounding (sums over two
    processes round otherwise)."""
    pytest.importorskip("tensorflow_datasets")
    script = [sys.executable, str(Path(__file__).parent / "tfds_hosts_run.py")]
    base = {**os.environ, "JAX_PLATFORMS": "cpu"}
    one = subprocess.run([*script, str(tmp_path / "one.json")], capture_output=True,
                         text=True, timeout=300, env={
                             **base, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen(
        [*script, str(tmp_path / f"host{i}.json")], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
             "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    single = json.loads((tmp_path / "one.json").read_text())
    hosts = [json.loads((tmp_path / f"host{i}.json").read_text()) for i in range(2)]
    assert [h["rows"] for h in hosts] == [[0, 1, 2, 3, 8, 9, 10, 11],
                                          [4, 5, 6, 7, 12, 13, 14, 15]]
    reads = [h["train_reads"] for h in hosts]
    assert len(reads[0]) == len(reads[1]) == len(single["train_reads"]) // 2 == 40
    assert not set(reads[0]) & set(reads[1])
    assert sorted(reads[0] + reads[1]) == sorted(single["train_reads"])
    for h in hosts:
        assert h["logits_before"] == single["logits_before"]
        # Means over the global batch are sums over the processes (Gloo), which may round
        # otherwise (jax 0.12 does; 0.10 gives the same bits); so then do the weights.
        np.testing.assert_allclose(h["losses"], single["losses"], rtol=1e-6)
        np.testing.assert_allclose(h["logits_after"], single["logits_after"], atol=1e-5)
        assert len(h["test_reads"]) == 48  # its half of the 96 test records


def test_sigterm_to_one_host_stops_both_at_one_step_and_resumes_exactly(synthetic_dir,
                                                                        tmp_path):
    """Only process 1 gets SIGTERM (after it saves step 30): the hosts agree, both save the
    same step and stop; run again, they end as two hosts never interrupted."""
    args = ("--epochs=2", "--batch_size=32", "--steps_per_dispatch=5",
            "--checkpoint_every_steps=10")
    whole = _two_hosts(synthetic_dir, tmp_path / "whole", *args)
    assert [o[0] for o in whole] == [0, 0], whole[0][2][-2000:] + whole[1][2][-2000:]
    cut = _two_hosts(synthetic_dir, tmp_path / "cut", *args,
                     env_of=lambda i: {"FMNIST_TEST_SIGTERM_AT_STEP": "30"} if i else {})
    assert [o[0] for o in cut] == [143, 143], cut[0][2][-2000:] + cut[1][2][-2000:]
    stopped = [o[2].split("stopped at step ")[1].split()[0] for o in cut]
    assert stopped[0] == stopped[1] and 30 < int(stopped[0]) <= 35  # the next dispatch
    assert max(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir()
               if p.name.isdigit()) == int(stopped[0])
    resumed = _two_hosts(synthetic_dir, tmp_path / "cut", *args)
    assert [o[0] for o in resumed] == [0, 0], resumed[0][2][-2000:] + resumed[1][2][-2000:]
    strip = lambda rs: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k}  # noqa
                        for r in rs]
    assert strip(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == strip(
        read_jsonl(tmp_path / "whole" / "metrics.jsonl"))
    a, b = (json.loads((tmp_path / w / "summary.json").read_text()) for w in ("cut", "whole"))
    assert (a["test_loss"], a["test_accuracy"]) == (b["test_loss"], b["test_accuracy"])


def test_cpu_compiler_options():
    """jax.checkpoint's barriers kept, asked of XLA per program (jax.jit's
    compiler_options), never through XLA_FLAGS."""
    from fmnist_jax import kernels

    assert kernels.cpu_compiler_options() == {"xla_disable_hlo_passes": "cse_barrier_expander"}
    assert "XLA_FLAGS" not in os.environ or "cse" not in os.environ["XLA_FLAGS"]


def test_threefry_unrolled_on_cpu_gives_the_same_bits():
    """Asked for (the command line asks), Threefry compiles without a loop on CPU; the bits
    must be JAX's own, as a process that did not ask computes them."""
    code = ("import jax, numpy as np; {setup}k = jax.random.key(7); "
            "f = jax.jit(lambda k: jax.random.bits(k, (3, 1000))); b = np.asarray(f(k)); "
            "print('while' in f.lower(k).as_text(), b.astype(np.uint64).sum(), int(b[2, 999]))")
    run = lambda setup: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code.format(setup=setup)], capture_output=True, text=True,
        check=True).stdout.split()
    plain = run("")
    ours = run("from fmnist_jax.tuning import unroll_threefry_on_cpu as u; assert u(); ")
    assert plain[0] == "True" and ours[0] == "False"  # JAX's loop; straight-line code
    assert ours[1:] == plain[1:]
