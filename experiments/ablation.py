"""What each ingredient of a recipe is worth, on validation: the recipe, then the recipe with
one ingredient changed, each a whole training process, one after another.

    python experiments/ablation.py                          # best_cpu's ingredients
    python experiments/ablation.py --preset=best_cpu --only=recipe,no_crop --seeds=0,1
    python experiments/ablation.py --recipe="--epochs=12" \
        --variant="lr_8e-3=--learning_rate=0.008" --only=recipe,lr_8e-3,no_crop

Every run holds out the first 5,000 training images (``--validation_size=5000``, whatever
the preset says) and never reads the test split's accuracy into the table: the choices are
made here. For each run the table gives the validation accuracy of the run's model (with
the recipe's test-time augmentation), of the same weights seen once per image (the last
epoch's validation), the
whole process from launch to exit, and the median epoch; the difference to ``recipe`` in
points and in seconds. The test-time augmentation's own row needs no run of its own: it is
the difference between the first two columns.

Prints a markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmark import _ours  # a training process, timed, with its summary and records

# Each variant: the flags that change one ingredient of the preset (best_cpu's values).
VARIANTS = {
    "recipe": [],
    "adam": ["--optimizer=adam"],
    "no_crop": ["--random_crop=0"],
    "crop_2": ["--random_crop=2"],
    "no_smoothing": ["--label_smoothing=0"],
    "no_ema": ["--ema_decay=0"],
    "dense_512": ["--dense=512", "--dropout=0.2"],
    "12_epochs": ["--epochs=12"],
}


def run(preset: str, recipe: list[str], flags: list[str], seed: int) -> dict:
    out = _ours([f"--preset={preset}", *recipe, "--validation_size=5000", f"--seed={seed}",
                 *flags, "--noplots"])
    records = out["records"]
    return {"flags": flags, "seed": seed, "val_accuracy": out["summary"]["val_accuracy"],
            "val_accuracy_one_view": records[-1]["val_accuracy"],
            "train_accuracy": records[-1]["train_accuracy"], "wall_s": out["wall_s"],
            "epoch_s": statistics.median(r["epoch_time_s"] for r in records[1:] or records),
            "epochs": len(records)}


def table(runs: dict) -> str:
    lines = ["| variant | flags | val (recipe's TTA) | val, one view | whole process | "
             "s/epoch | points | seconds |", "|---|---|---|---|---|---|---|---|"]
    base = runs.get("recipe")
    for name, rs in runs.items():
        val = statistics.mean(r["val_accuracy"] for r in rs)
        one = statistics.mean(r["val_accuracy_one_view"] for r in rs)
        wall = statistics.mean(r["wall_s"] for r in rs)
        epoch = statistics.mean(r["epoch_s"] for r in rs)
        seeds = ", ".join(f"{100 * r['val_accuracy']:.2f}" for r in rs)
        diff = ("" if base is None or name == "recipe" else
                f"{100 * (val - statistics.mean(r['val_accuracy'] for r in base)):+.2f} | "
                f"{wall - statistics.mean(r['wall_s'] for r in base):+.0f} s")
        lines.append(f"| {name} | `{' '.join(rs[0]['flags']) or '(the preset)'}` | "
                     f"{100 * val:.2f}% ({seeds}) | {100 * one:.2f}% | {wall:.0f} s | "
                     f"{epoch:.1f} s | {diff or ' | '} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="best_cpu")
    parser.add_argument("--recipe", default="",
                        help="flags on top of --preset that make the recipe (space-separated); "
                             "every variant starts from them")
    parser.add_argument("--only", default=",".join(VARIANTS),
                        help="variants, comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", default="0", help="seeds, comma-separated")
    parser.add_argument("--variant", action="append", default=[],
                        help="a further variant, NAME=FLAGS (space-separated), to name in "
                             "--only; repeatable")
    parser.add_argument("--out", default="ablation.json")
    args = parser.parse_args()
    for extra in args.variant:
        name, _, flags = extra.partition("=")
        VARIANTS[name] = flags.split()
    runs: dict[str, list] = {}
    for name in args.only.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            runs.setdefault(name, []).append(run(args.preset, args.recipe.split(), VARIANTS[name], seed))
            Path(args.out).write_text(json.dumps({"preset": args.preset, "recipe": args.recipe,
                                                  "runs": runs},
                                                 indent=2))
            print(f"{name} seed {seed}: {runs[name][-1]}", flush=True)
    print(table(runs))


if __name__ == "__main__":
    main()
