"""What each of the command line's process tweaks (``fmnist_jax/tuning.py``) is worth: whole
processes, launch to exit, with all of them and with each one turned off, side by side.

    python experiments/tuning.py                        # default CNN and seed MLP, 2 rounds
    python experiments/tuning.py --runs="--model=cnn --epochs=2" --rounds=3

Each round runs every variant once, in turn (so a slow spell of the machine hits all of them
alike); the table gives each variant's median wall time and peak RSS, and the difference to
"all" in seconds and in percent. The variants:

- ``all``: ``python -m fmnist_jax.train`` as shipped;
- ``no_exit_now``: the process ends through Python's teardown (``sys.exit``);
- ``no_threefry``: JAX's own Threefry lowering (a loop) on the CPU;
- ``no_trim``: no ``malloc_trim`` after compiling;
- ``no_cache``: ``--nocompilation_cache``; the others run with the cache filled by a first,
  untimed run of each (every run after a user's first; the Threefry lowering changes what
  is compiled, so each variant fills its own entries).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("all", "no_exit_now", "no_threefry", "no_trim", "no_cache")

# The command line with some of its tweaks turned off.
LAUNCH = """
import sys
import fmnist_jax.train as train
import fmnist_jax.tuning as tuning
off = sys.argv[1]
if off == "no_exit_now":
    train.exit_now = sys.exit
if off == "no_threefry":
    tuning.unroll_threefry_on_cpu = lambda: False
if off == "no_trim":
    tuning.trim_after_compiling = lambda *args, **kwargs: None
sys.argv = ["fmnist-train", *sys.argv[2:]]
train.command()
"""


def run(variant: str, args: list[str], cache: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        flags = [*args, "--noprogress", f"--workdir={workdir}"]
        if variant == "no_cache":
            flags.append("--nocompilation_cache")
        launched = time.perf_counter()
        subprocess.run([sys.executable, "-c", LAUNCH, variant, *flags], check=True, cwd=REPO,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                            "XDG_CACHE_HOME": cache, **_data_env()},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - launched
        summary = json.loads((Path(workdir) / "summary.json").read_text())
    return {"wall_s": wall, "peak_rss_mb": summary["peak_rss_mb"],
            "test_accuracy": summary["test_accuracy"]}


def _data_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k in ("FMNIST_DATA_DIR", "XDG_DATA_DIRS")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", action="append", default=[],
                        help="the flags of a run to measure (repeatable); default: the "
                             "default CNN and the seed MLP preset")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--out", default="tuning.json")
    args = parser.parse_args()
    results = {}
    for flags in args.runs or ["--model=cnn", "--preset=mlp_seed --epochs=10"]:
        variants = ["all", *(v for v in args.variants.split(",") if v != "all")]
        rows = {v: [] for v in variants}
        with tempfile.TemporaryDirectory() as cache:
            for variant in variants:  # fills the compilation cache
                if variant != "no_cache":
                    run(variant, flags.split(), cache)
            for _ in range(args.rounds):
                for variant in variants:
                    rows[variant].append(run(variant, flags.split(), cache))
                    print(flags, variant, rows[variant][-1], flush=True)
        results[flags] = rows
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    lines = []
    for flags, rows in results.items():
        base = statistics.median(r["wall_s"] for r in rows["all"])
        lines.append(f"\n{flags} (median of {len(rows['all'])}; launch to exit)")
        lines.append(f"  {'variant':<12}{'wall s':>8}{'vs all':>9}{'%':>7}{'peak RSS MB':>13}")
        for variant, runs in rows.items():
            wall = statistics.median(r["wall_s"] for r in runs)
            rss = statistics.median(r["peak_rss_mb"] for r in runs)
            lines.append(f"  {variant:<12}{wall:>8.1f}{wall - base:>+9.2f}"
                         f"{100 * (wall - base) / base:>+7.1f}{rss:>13,.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
