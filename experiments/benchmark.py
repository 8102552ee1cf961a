"""Speed, side by side: fmnist_jax against PyTorch and Keras, whole processes and epochs.

    make peers                                  # once: .venv-peers with torch and keras
    python experiments/benchmark.py             # everything (~40 min on 2 CPU cores)
    python experiments/benchmark.py --only=mlp_seed,cnn_seed --repeats=2
    python experiments/benchmark.py --only=pytorch_epoch --records=cnn,best_cpu --seeds=0,1,2

Every run is its own process, one at a time, on the same data and the same CPU, and is
timed from launch to exit (what a user waits for). Measured:

- ``mlp_seed``, ``cnn_seed``: the seeds' models with the same batch size, optimizer and
  epochs in fmnist_jax (the command line as a user runs it: checkpoints, validation, plots),
  PyTorch (eager) and Keras 3; for each, the whole process and the steady-state epoch
  (median over the epochs after the first, which holds JAX's compilation), images/s, test
  accuracy and peak RSS; then our times divided by each peer's. ``--repeats`` runs the
  whole comparison again and reports the spread. Ours runs with an empty compilation cache
  (a user's first run) and again with it filled (every later run).
- ``time_to_accuracy``: the default ``--model=cnn`` (and each further ``--tta_args``,
  e.g. ``--tta_args="--random_crop=2 --epochs=20"``), from process start to the first
  epoch whose test accuracy reaches each of ``--targets`` (the test split is evaluated
  after every epoch for this measurement only), and to the end of the process, in seconds
  and in **PyTorch epochs**: the steady-state epoch of the seed CNN in PyTorch measured in
  the same run.
- ``--run_args``: a run timed as a user runs it (e.g. ``--run_args=--preset=best_cpu``):
  no test evaluation per epoch; its final test result (with the run's test-time
  augmentation) counts for the targets, at the process age it was printed.
- ``--records=cnn,best_cpu,...``: the record table's rows, for each preset (and each of
  ``--seeds``, with any ``--record_flags`` on top): process start to each target, as
  ``time_to_accuracy`` measures it, with the seconds of the benchmark's own per-epoch test
  evaluations taken off (what the user's run of ``python -m fmnist_jax.train
  --preset=NAME`` would take to that epoch), then the run's final result (with its
  test-time augmentation) and its whole process; printed as markdown rows with the date,
  machine and versions.
- ``pytorch_epoch``: the PyTorch seed CNN alone, for the unit, when ``cnn_seed`` (which
  also runs ours and Keras) is not wanted.
- ``plots``: seconds from the test result to the end of the process (plots, exit), from
  the seed runs above.
- ``rss``: peak RSS of every preset, on a run cut to 20 training steps and both
  evaluations (what a full epoch holds at its peak).
- ``startup``: process start to the training loop and to the end of the first step, with
  the compilation cache empty and filled.

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
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
SEEDS = {"mlp_seed": ("mlp", "mlp_seed", 32), "cnn_seed": ("cnn", "cnn_seed", 128)}


def _ours(args: list[str], env: dict | None = None, source: Path = REPO) -> dict:
    """Runs the training command of the checkout ``source`` in its own process; its summary,
    records and wall time."""
    with tempfile.TemporaryDirectory() as workdir:
        launched = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fmnist_jax.train", *args, "--noprogress",
                        f"--workdir={workdir}"], check=True, cwd=source,
                       env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - launched
        summary = json.loads((Path(workdir) / "summary.json").read_text())
        records = [json.loads(line) for line in
                   (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "records": records, "wall_s": wall,
            "after_test_s": wall - summary["test_done_s"]}


def _peer(python: str, framework: str, model: str, epochs: int, batch_size: int) -> dict:
    launched = time.perf_counter()
    done = subprocess.run([python, str(HERE / "peers" / f"{framework}_seed.py"), model,
                           str(epochs), str(batch_size)], check=True, capture_output=True,
                          text=True, cwd=HERE / "peers")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - launched
    return out


def _epochs(times: list[float], batch_size: int, images: int = 55_000) -> dict:
    steady = times[1:] or times
    per_epoch = statistics.median(steady)
    return {"s_per_epoch": per_epoch, "min": min(steady), "max": max(steady),
            "images_per_s": (images // batch_size) * batch_size / per_epoch}


def seed_model(name: str, epochs: int, peers_python: str | None,
               before: Path | None = None) -> dict:
    """One comparison of ``name`` (mlp_seed or cnn_seed), every framework once (and the
    checkout ``before``, when given, as ``before`` and ``before_warm``)."""
    model, preset, batch = SEEDS[name]
    rows = {}
    ours = [("fmnist_jax", REPO), ("fmnist_jax_warm", REPO)]
    if before is not None:
        ours += [("before", before), ("before_warm", before)]
    caches = {}
    with tempfile.TemporaryDirectory() as cache_root:
        for label, source in ours:
            cache = caches.setdefault(source, tempfile.mkdtemp(dir=cache_root))
            run = _ours([f"--preset={preset}", f"--epochs={epochs}"],
                        env={"XDG_CACHE_HOME": cache}, source=source)
            rows[label] = {**_epochs([r["epoch_time_s"] for r in run["records"]], batch),
                           "wall_s": run["wall_s"], "after_test_s": run["after_test_s"],
                           "test_accuracy": run["summary"]["test_accuracy"],
                           "peak_rss_mb": run["summary"]["peak_rss_mb"]}
    for framework in ("torch", "keras"):
        if not peers_python:
            continue
        try:
            out = _peer(peers_python, framework, model, epochs, batch)
        except subprocess.CalledProcessError as e:
            rows[framework] = {"error": e.stderr[-500:]}
            continue
        rows[framework] = {**_epochs(out["epoch_times_s"], batch), "wall_s": out["wall_s"],
                           "test_accuracy": out["test_accuracy"][-1],
                           "peak_rss_mb": out["peak_rss_mb"]}
    for ours in (label for label, _ in ours):
        for framework, row in rows.items():
            if framework in ("torch", "keras") and "s_per_epoch" in row:
                rows[ours][f"epoch_ratio_to_{framework}"] = (
                    rows[ours]["s_per_epoch"] / row["s_per_epoch"])
                rows[ours][f"wall_ratio_to_{framework}"] = rows[ours]["wall_s"] / row["wall_s"]
    return {"epochs": epochs, "batch_size": batch, "rows": rows}


def time_to_accuracy(targets: list[float], extra: list[str], pytorch_epoch: float | None,
                     every_epoch: bool = True, source: Path = REPO) -> dict:
    """Process start to each target test accuracy: at the first epoch that reaches it
    (``every_epoch``: the test split evaluated after each epoch, one view per image), else
    at the run's final test result (with the run's test-time augmentation, if any)."""
    run = _ours(["--test_every_epoch", *extra] if every_epoch else extra, source=source)
    summary = run["summary"]
    final = {"process_age_s": summary["test_done_s"], "epoch": "final",
             "test_accuracy": summary["test_accuracy"]}
    # The per-epoch test evaluations are the benchmark's, not the run's: the seconds spent
    # on them up to each record (all of them, for the final result) are taken off.
    spent, taken_off = 0.0, []
    for r in run["records"]:
        spent += r.get("test_eval_s", 0.0)
        taken_off.append(spent)
    taken_off.append(spent)
    reached = {}
    for target in targets:
        i, record = next(((i, r) for i, r in enumerate([*run["records"], final])
                          if r.get("test_accuracy", 0) >= target), (None, None))
        seconds = None if record is None else record["process_age_s"] - taken_off[i]
        reached[str(target)] = None if record is None else {
            "seconds": seconds, "epoch": record["epoch"],
            "pytorch_epochs": seconds / pytorch_epoch if pytorch_epoch else None}
    wall = run["wall_s"] - spent
    return {"args": extra, "source": str(source), "every_epoch": every_epoch,
            "reached": reached,
            "pytorch_epoch_s": pytorch_epoch,
            "wall_pytorch_epochs": wall / pytorch_epoch if pytorch_epoch else None,
            "per_epoch": [(r["epoch"], r.get("process_age_s"), r.get("test_accuracy"),
                           r.get("val_accuracy"), round(r["epoch_time_s"], 2))
                          for r in run["records"]],
            "final_test_accuracy": summary["test_accuracy"],
            "final_val_accuracy": summary["val_accuracy"],
            "wall_s": wall, "test_evaluations_s": spent,
            "peak_rss_mb": summary["peak_rss_mb"]}


RSS_SCRIPT = """
import sys, json
import numpy as np
import fmnist_jax
from fmnist_jax.data import Dataset, Split, load_dataset
data = load_dataset()
preset = sys.argv[1]
config = fmnist_jax.preset(preset, epochs=1, progress=False)
cut = config.batch_size * 20
train = Split(data.train.images[:cut], data.train.labels[:cut])
result = fmnist_jax.fit(config, data=Dataset(train, data.validation, data.test))
print(json.dumps({"peak_rss_mb": result.summary["peak_rss_mb"]}))
"""


def rss() -> dict:
    from fmnist_jax.config import PRESETS

    out = {}
    for name in PRESETS:
        done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, name], capture_output=True,
                              text=True, check=True, cwd=REPO)
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return out


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
    parser.add_argument("--only", default="mlp_seed,cnn_seed,time_to_accuracy,rss,startup")
    parser.add_argument("--peers_python", default=str(REPO / ".venv-peers/bin/python"),
                        help="python with torch and keras (make peers); '' skips peers")
    parser.add_argument("--mlp_epochs", type=int, default=10)
    parser.add_argument("--cnn_epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the seed comparisons this many times (the spread)")
    parser.add_argument("--targets", default="0.93,0.94,0.95",
                        help="test accuracies for time_to_accuracy, comma-separated")
    parser.add_argument("--tta_args", action="append", default=[],
                        help="flags of a further time-to-accuracy run, space-separated; "
                             "repeatable (the default CNN always runs first)")
    parser.add_argument("--run_args", action="append", default=[],
                        help="flags of a run timed as a user runs it (no test evaluation "
                             "per epoch; its final test result is what counts), e.g. "
                             "--run_args=--preset=best_cpu; repeatable")
    parser.add_argument("--records", default="",
                        help="presets for the record table, comma-separated (e.g. "
                             "cnn,best_cpu): each run with the test split evaluated after "
                             "every epoch, those evaluations' seconds taken off its times")
    parser.add_argument("--seeds", default="0",
                        help="the seeds of each --records preset, comma-separated")
    parser.add_argument("--record_flags", default="",
                        help="flags added to every --records run (space-separated), e.g. "
                             "a recipe on top of a preset: --records=best_cpu "
                             "--record_flags='--optimizer=muon --epochs=12'")
    parser.add_argument("--pytorch_epoch_s", type=float, default=0.0,
                        help="the PyTorch seed-CNN epoch to divide by, when cnn_seed is "
                             "not part of this run")
    parser.add_argument("--before", default="",
                        help="another checkout of fmnist_jax (e.g. a git worktree of an older "
                             "commit) run side by side in the seed comparisons and the "
                             "default CNN's time to accuracy, in the same environment")
    parser.add_argument("--out", default="benchmark.json")
    args = parser.parse_args()
    before = Path(args.before).resolve() if args.before else None
    peers = args.peers_python if args.peers_python and Path(args.peers_python).exists() \
        else None
    results = {"machine": _machine(), "args": vars(args)}
    parts = args.only.split(",")
    if "pytorch_epoch" in parts and peers:
        out = _peer(peers, "torch", "cnn", args.cnn_epochs, SEEDS["cnn_seed"][2])
        results["pytorch_epoch"] = {**_epochs(out["epoch_times_s"], SEEDS["cnn_seed"][2]),
                                    "wall_s": out["wall_s"]}
    for part in (p for p in ("mlp_seed", "cnn_seed") if p in parts):
        epochs = args.mlp_epochs if part == "mlp_seed" else args.cnn_epochs
        results[part] = [seed_model(part, epochs, peers, before) for _ in range(args.repeats)]
        Path(args.out).write_text(json.dumps(results, indent=2))
    targets = [float(t) for t in args.targets.split(",")]
    if "time_to_accuracy" in parts:
        results["time_to_accuracy"] = [
            time_to_accuracy(targets, extra.split(),
                             args.pytorch_epoch_s or pytorch_epoch(results), source=source)
            for extra in ["", *args.tta_args]
            for source in ([REPO, before] if before and not extra else [REPO])]
    if args.run_args:
        results["runs"] = [
            time_to_accuracy(targets, extra.split(),
                             args.pytorch_epoch_s or pytorch_epoch(results), False)
            for extra in args.run_args]
    if args.records:
        results["records"] = []
        for name in args.records.split(","):
            for seed in args.seeds.split(","):
                results["records"].append(time_to_accuracy(
                    targets,
                    [f"--preset={name}", *args.record_flags.split(), f"--seed={seed}"],
                    args.pytorch_epoch_s or pytorch_epoch(results)))
                Path(args.out).write_text(json.dumps(results, indent=2))
    if "rss" in parts:
        results["rss"] = rss()
    if "startup" in parts:
        results["startup"] = startup()
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(_table(results))


def pytorch_epoch(results: dict) -> float | None:
    """The steady-state epoch of the seed CNN in PyTorch, median over the repeats."""
    if "pytorch_epoch" in results:
        return results["pytorch_epoch"]["s_per_epoch"]
    epochs = [r["rows"]["torch"]["s_per_epoch"] for r in results.get("cnn_seed", [])
              if "s_per_epoch" in r["rows"].get("torch", {})]
    return statistics.median(epochs) if epochs else None


def record_rows(results: dict) -> str:
    """The record table's rows (markdown): for each preset and seed, process start to each
    target test accuracy and to exit, in seconds and in PyTorch epochs."""
    import datetime

    targets = list(results["records"][0]["reached"])
    machine = results["machine"]
    pe = results["records"][0]["pytorch_epoch_s"]
    lines = [f"{datetime.date.today()}, {machine['cores']} cores of {machine['cpu']}, "
             f"Python {machine['python']}, jax {machine['jax']}; PyTorch epoch "
             + (f"{pe:.2f} s" if pe else "not timed") + "; seconds (PyTorch epochs) from "
             "launch, the benchmark's own test evaluations taken off\n",
             "| command | " + " | ".join(f"{100 * float(t):g}% test" for t in targets)
             + " | final test | whole process |",
             "|---|" + "---|" * (len(targets) + 2)]

    def cell(seconds, pytorch_epochs):
        return f"{seconds:.0f} s" + (f" ({pytorch_epochs:.2f})" if pytorch_epochs else "")

    for r in results["records"]:
        cells = ["—" if got is None else cell(got["seconds"], got["pytorch_epochs"])
                 + ("" if got["epoch"] == "final" else f", epoch {got['epoch']}")
                 for got in r["reached"].values()]
        lines.append(f"| `python -m fmnist_jax.train {' '.join(r['args'])}` | "
                     + " | ".join(cells)
                     + f" | {100 * r['final_test_accuracy']:.2f}% | "
                     + cell(r["wall_s"], r["wall_pytorch_epochs"]) + " |")
    return "\n".join(lines)


def _machine() -> dict:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "jax": importlib.metadata.version("jax")}


def _table(results: dict) -> str:
    lines = [f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores"]
    for part in ("mlp_seed", "cnn_seed"):
        for i, r in enumerate(results.get(part, [])):
            lines.append(f"\n{part} run {i + 1} (batch {r['batch_size']}, {r['epochs']} "
                         "epochs; steady state = median of epochs 2+; whole = launch to exit):")
            lines.append(f"  {'':<16}{'s/epoch':>9}{'whole s':>9}{'test acc':>10}"
                         f"{'peak RSS':>10}{'epoch ratio':>13}{'whole ratio':>13}")
            for name, row in r["rows"].items():
                if "error" in row:
                    lines.append(f"  {name:<16} failed: {row['error'][-120:]}")
                    continue
                ratios = "".join(
                    f"{row[key]:>13.2f}" if key in row else f"{'':>13}"
                    for key in ("epoch_ratio_to_torch", "wall_ratio_to_torch"))
                lines.append(f"  {name:<16}{row['s_per_epoch']:>9.2f}{row['wall_s']:>9.1f}"
                             f"{100 * row['test_accuracy']:>9.2f}%"
                             f"{row['peak_rss_mb']:>8,.0f}MB{ratios}")
    if "pytorch_epoch" in results:
        lines.append(f"PyTorch seed-CNN epoch: {results['pytorch_epoch']['s_per_epoch']:.2f} s")
    for t in [*results.get("time_to_accuracy", []), *results.get("runs", [])]:
        for target, got in t["reached"].items():
            text = "not reached" if got is None else (
                f"{got['seconds']:.1f} s (epoch {got['epoch']})" + (
                    f" = {got['pytorch_epochs']:.2f} PyTorch epochs"
                    if got["pytorch_epochs"] else ""))
            where = "" if t.get("source", str(REPO)) == str(REPO) else f" ({t['source']})"
            lines.append(f"\n{' '.join(t['args']) or 'default cnn'}{where}: process start to "
                         f"{100 * float(target):.1f}% test: {text}")
        whole = (f" = {t['wall_pytorch_epochs']:.2f} PyTorch epochs"
                 if t["wall_pytorch_epochs"] else "")
        val = t["final_val_accuracy"]
        lines.append(f"  final test {100 * t['final_test_accuracy']:.2f}%, val "
                     f"{'-' if val is None else f'{100 * val:.2f}%'}, whole process "
                     f"{t['wall_s']:.1f} s{whole}, peak RSS {t['peak_rss_mb']:,.0f} MB")
    if results.get("records"):
        lines.append("\n" + record_rows(results))
    if "rss" in results:
        lines.append("\npeak RSS: " + ", ".join(f"{k} {v:,.0f} MB"
                                               for k, v in results["rss"].items()))
    for label, s in results.get("startup", {}).items():
        lines.append(f"startup, {label} compilation cache: training loop starts at "
                     f"{s['training_loop_starts_s']:.1f} s, first step done at "
                     f"{s['first_step_done_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
