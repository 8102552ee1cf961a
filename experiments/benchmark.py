"""Speed, side by side: fmnist_jax against PyTorch and Keras on the seeds' models.

    make peers                                  # once: .venv-peers with torch and keras
    python experiments/benchmark.py             # everything (~25 min on 2 CPU cores)
    python experiments/benchmark.py --only=mlp_seed,startup

Every run is its own process, one at a time, on the same data and the same CPU. Measured:

- ``mlp_seed``, ``cnn_seed``: seconds per epoch in the steady state (median over the epochs
  after the first, which holds JAX's compilation; spread = min and max), images/s, test
  accuracy, peak RSS, for fmnist_jax, PyTorch (eager loop) and Keras 3 (TensorFlow), with
  the same batch size, optimizer and epochs; then our time divided by each peer's.
- ``time_to_accuracy``: the default ``--model=cnn`` run, from process start to the first
  epoch whose test accuracy reaches ``--target`` (the test split is evaluated after every
  epoch for this measurement only), and its final accuracy and peak RSS.
- ``startup``: from process start to the end of the first training step, with JAX's
  persistent compilation cache empty (cold) and filled (warm).

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _ours(args: list[str], env: dict | None = None) -> dict:
    """Runs the training CLI; returns its summary, per-epoch records and launch time."""
    with tempfile.TemporaryDirectory() as workdir:
        launched = time.time()
        subprocess.run([sys.executable, "-m", "fmnist_jax.train", *args, "--noprogress",
                        "--noplots", f"--workdir={workdir}"], check=True, cwd=REPO,
                       env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
        summary = json.loads((Path(workdir) / "summary.json").read_text())
        records = [json.loads(line) for line in
                   (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "records": records, "launched": launched}


def _peer(python: str, framework: str, model: str, epochs: int, batch_size: int) -> dict:
    launched = time.time()
    done = subprocess.run([python, str(HERE / "peers" / f"{framework}_seed.py"), model,
                           str(epochs), str(batch_size)], check=True, capture_output=True,
                          text=True, cwd=HERE / "peers")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["first_step_s"] = out.pop("first_step_unix_time") - launched
    return out


def _epochs(times: list[float], batch_size: int, images: int = 55_000) -> dict:
    steady = times[1:] or times
    per_epoch = statistics.median(steady)
    return {"s_per_epoch": per_epoch, "min": min(steady), "max": max(steady),
            "images_per_s": (images // batch_size) * batch_size / per_epoch,
            "epochs_timed": len(steady)}


def seed_model(name: str, epochs: int, peers_python: str | None) -> dict:
    model, preset, batch = {"mlp_seed": ("mlp", "mlp_seed", 32),
                            "cnn_seed": ("cnn", "cnn_seed", 128)}[name]
    ours = _ours([f"--preset={preset}", f"--epochs={epochs}", "--test_every_epoch"])
    rows = {"fmnist_jax": {**_epochs([r["epoch_time_s"] for r in ours["records"]], batch),
                           "test_accuracy": ours["records"][-1]["test_accuracy"],
                           "peak_rss_mb": ours["summary"]["peak_rss_mb"]}}
    for framework in ("torch", "keras"):
        if not peers_python:
            continue
        try:
            out = _peer(peers_python, framework, model, epochs, batch)
        except subprocess.CalledProcessError as e:
            rows[framework] = {"error": e.stderr[-500:]}
            continue
        rows[framework] = {**_epochs(out["epoch_times_s"], batch),
                           "test_accuracy": out["test_accuracy"][-1],
                           "peak_rss_mb": out["peak_rss_mb"]}
    for framework, row in rows.items():
        if framework != "fmnist_jax" and "s_per_epoch" in row:
            rows["fmnist_jax"][f"ratio_to_{framework}"] = (
                rows["fmnist_jax"]["s_per_epoch"] / row["s_per_epoch"])
    return {"epochs": epochs, "batch_size": batch, "rows": rows}


def time_to_accuracy(target: float, extra: list[str]) -> dict:
    ours = _ours(["--model=cnn", "--test_every_epoch", *extra])
    reached = next((r for r in ours["records"] if r["test_accuracy"] >= target), None)
    return {"target": target, "args": extra,
            "seconds": reached["process_age_s"] if reached else None,
            "epoch": reached["epoch"] if reached else None,
            "per_epoch": [(r["epoch"], round(r["process_age_s"], 1), r["test_accuracy"])
                          for r in ours["records"]],
            "final_test_accuracy": ours["summary"]["test_accuracy"],
            "peak_rss_mb": ours["summary"]["peak_rss_mb"]}


def startup() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold", "warm"):
            run = _ours(["--model=cnn", "--epochs=1", "--steps_per_dispatch=1"],
                        env={"XDG_CACHE_HOME": cache})
            s = run["summary"]
            out[label] = {"training_loop_starts_s": s["training_starts_s"],
                          "first_step_done_s": s["first_dispatch_done_s"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="mlp_seed,cnn_seed,time_to_accuracy,startup")
    parser.add_argument("--peers_python", default=str(REPO / ".venv-peers/bin/python"),
                        help="python with torch and keras (make peers); '' skips peers")
    parser.add_argument("--mlp_epochs", type=int, default=4)
    parser.add_argument("--cnn_epochs", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.91)
    parser.add_argument("--tta_args", default="",
                        help="extra flags for the time-to-accuracy run, space-separated")
    parser.add_argument("--out", default="benchmark.json")
    args = parser.parse_args()
    peers = args.peers_python if args.peers_python and Path(args.peers_python).exists() \
        else None
    results = {"machine": _machine(), "args": vars(args)}
    for part in args.only.split(","):
        if part in ("mlp_seed", "cnn_seed"):
            results[part] = seed_model(part, args.mlp_epochs if part == "mlp_seed"
                                       else args.cnn_epochs, peers)
        elif part == "time_to_accuracy":
            results[part] = time_to_accuracy(args.target, args.tta_args.split())
        elif part == "startup":
            results[part] = startup()
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(_table(results))


def _machine() -> dict:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def _table(results: dict) -> str:
    lines = [f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores"]
    for part in ("mlp_seed", "cnn_seed"):
        if part not in results:
            continue
        r = results[part]
        lines.append(f"\n{part} (batch {r['batch_size']}, {r['epochs']} epochs; steady "
                     "state = median of epochs 2+):")
        lines.append(f"  {'':<11}{'s/epoch':>9}{'spread':>16}{'images/s':>10}"
                     f"{'test acc':>10}{'peak RSS':>10}{'ours/this':>10}")
        ours = r["rows"]["fmnist_jax"]["s_per_epoch"]
        for name, row in r["rows"].items():
            if "error" in row:
                lines.append(f"  {name:<11} failed: {row['error'][-120:]}")
                continue
            spread = f"{row['min']:.2f}-{row['max']:.2f}"
            lines.append(f"  {name:<11}{row['s_per_epoch']:>9.2f}{spread:>16}"
                         f"{row['images_per_s']:>10,.0f}{100 * row['test_accuracy']:>9.2f}%"
                         f"{row['peak_rss_mb']:>8,.0f}MB{ours / row['s_per_epoch']:>10.2f}")
    if "time_to_accuracy" in results:
        t = results["time_to_accuracy"]
        got = f"{t['seconds']:.1f} s (epoch {t['epoch']})" if t["seconds"] else "not reached"
        lines.append(f"\ndefault cnn {' '.join(t['args'])}: process start to "
                     f"{100 * t['target']:.1f}% test accuracy: {got}; final "
                     f"{100 * t['final_test_accuracy']:.2f}%, peak RSS "
                     f"{t['peak_rss_mb']:,.0f} MB")
    if "startup" in results:
        for label, s in results["startup"].items():
            lines.append(f"startup, {label} compilation cache: training loop starts at "
                         f"{s['training_loop_starts_s']:.1f} s, first step done at "
                         f"{s['first_step_done_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
