"""Experiment 3: optimizers and schedules on the default CNN, chosen on validation.

    python experiments/optimizer_study.py --epochs=15 --out=runs/optimizer_study

SGD with momentum, Adam, Adadelta and RMSprop, each with a constant learning rate and with
a warm-up cosine schedule, early stopping on validation accuracy (patience 3), plus Adam
with the categorical (one-hot) loss, which gives the same numbers as the sparse one. Writes
``results.json``, ``results.md`` (a table) and ``optimizers.png`` (a bar chart) into
``--out``. Every run uses the same seed and the same data.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fmnist_jax import Config, fit
from fmnist_jax.data import load_dataset

# Learning rates: each optimizer's usual one for this kind of model.
RUNS = [
    ("sgd", 0.05, "constant", "sparse"), ("sgd", 0.05, "warmup_cosine", "sparse"),
    ("adam", 3e-3, "constant", "sparse"), ("adam", 3e-3, "warmup_cosine", "sparse"),
    ("adadelta", 1.0, "constant", "sparse"), ("adadelta", 1.0, "warmup_cosine", "sparse"),
    ("rmsprop", 1e-3, "constant", "sparse"), ("rmsprop", 1e-3, "warmup_cosine", "sparse"),
    ("adam", 3e-3, "warmup_cosine", "categorical"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--out", default="runs/optimizer_study")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the chart from --out's results.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.replot:
        _bar_chart(json.loads((out / "results.json").read_text())["rows"],
                   out / "optimizers.png")
        return
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset()
    rows = []
    for optimizer, lr, schedule, loss in RUNS:
        config = Config(model="cnn", optimizer=optimizer, learning_rate=lr, schedule=schedule,
                        loss=loss, epochs=args.epochs, patience=args.patience,
                        label_smoothing=0.0, dropout=0.3,  # the CNN's defaults of the study
                        progress=False, plots=False)
        started = time.perf_counter()
        s = fit(config, data=data).summary
        rows.append({"optimizer": optimizer, "learning_rate": lr, "schedule": schedule,
                     "loss": loss, "epochs": s["epochs"], "best_epoch": s["best_epoch"],
                     "val_accuracy": s["val_accuracy"], "test_accuracy": s["test_accuracy"],
                     "test_loss": s["test_loss"], "seconds": time.perf_counter() - started})
        (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                     indent=2))
    best = max(rows, key=lambda r: r["val_accuracy"])  # chosen on validation, never test
    lines = ["| optimizer | lr | schedule | loss | epochs (best) | val acc | test acc | "
             "test loss | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **(best on val)**" if r is best else ""
        lines.append(f"| {r['optimizer']}{mark} | {r['learning_rate']:g} | {r['schedule']} | "
                     f"{r['loss']} | {r['epochs']} ({r['best_epoch']}) | "
                     f"{100 * r['val_accuracy']:.2f}% | {100 * r['test_accuracy']:.2f}% | "
                     f"{r['test_loss']:.4f} | {r['seconds']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _bar_chart(rows, out / "optimizers.png")
    print("\n".join(lines))


def _bar_chart(rows: list[dict], path: Path) -> None:
    from fmnist_jax.plots import figure

    labels = [f"{r['optimizer']}\n{r['schedule'].replace('warmup_', 'w-')}"
              + ("\none-hot" if r["loss"] == "categorical" else "") for r in rows]
    fig = figure(figsize=(12, 4.5), dpi=100)
    ax = fig.subplots()
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [100 * r["val_accuracy"] for r in rows], 0.4,
           label="validation")
    ax.bar([i + 0.2 for i in x], [100 * r["test_accuracy"] for r in rows], 0.4, label="test")
    ax.set_xticks(list(x), labels, fontsize=8)
    values = [100 * r[k] for r in rows for k in ("val_accuracy", "test_accuracy")]
    ax.set_ylim(max(min(values) - 1, 0), min(max(values) + 0.5, 100))
    for i, r in enumerate(rows):
        for dx, k in ((-0.2, "val_accuracy"), (0.2, "test_accuracy")):
            ax.text(i + dx, 100 * r[k] + 0.05, f"{100 * r[k]:.2f}", ha="center", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
