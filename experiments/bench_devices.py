"""Training throughput on 1, 2, 4 and 8 devices.

    python experiments/bench_devices.py [--model=cnn] [--epochs=2] [--simulate]

With ``--simulate`` (the default on a CPU-only machine) each device count is an XLA host
platform split into N devices (``--xla_force_host_platform_device_count``), all sharing the
same CPU cores: this checks that the sharded program is correct and measures its overhead;
it cannot show a speed-up. On a machine with accelerators, run without ``--simulate`` and
choose the devices of each run yourself (e.g. ``CUDA_VISIBLE_DEVICES``): the script runs
the training CLI once per count.

Prints a table and writes ``bench_devices.json``: steady-state images/s (the median over
the epochs after the first) and test accuracy for each device count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(devices: int, model: str, epochs: int, batch_size: int, simulate: bool) -> dict:
    env = dict(os.environ)
    if simulate:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
    with tempfile.TemporaryDirectory() as workdir:
        subprocess.run([sys.executable, "-m", "fmnist_jax.train", f"--model={model}",
                        f"--epochs={epochs}", f"--batch_size={batch_size}", "--noprogress",
                        "--noplots", f"--workdir={workdir}"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        summary = json.loads((Path(workdir) / "summary.json").read_text())
    return {"devices": summary["num_devices"], "images_per_s": summary["train_images_per_s"],
            "test_accuracy": summary["test_accuracy"], "backend": summary["jax_backend"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--counts", default="1,2,4,8")
    parser.add_argument("--simulate", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="bench_devices.json")
    args = parser.parse_args()
    rows = [run(int(n), args.model, args.epochs, args.batch_size, args.simulate)
            for n in args.counts.split(",")]
    base = rows[0]["images_per_s"]
    print(f"{'devices':>8} {'images/s':>10} {'vs 1':>6} {'test acc':>9}")
    for r in rows:
        print(f"{r['devices']:>8} {r['images_per_s']:>10,.0f} {r['images_per_s'] / base:>6.2f} "
              f"{100 * r['test_accuracy']:>8.2f}%")
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
