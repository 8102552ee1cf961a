"""Evaluate a trained workdir on the test split.

    python -m fmnist_jax.evaluate --workdir=runs/cnn [--checkpoint=best|latest|STEP]

Prints test loss and accuracy, per-class accuracy and the confusion matrix as a table;
writes ``eval.json`` and ``confusion_matrix.png`` into the workdir.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

from fmnist_jax import metrics as metrics_lib
from fmnist_jax.checkpoints import load_state
from fmnist_jax.cli import build_parser, quiet_library_logs
from fmnist_jax.data import CLASS_NAMES, load_dataset
from fmnist_jax.errors import UserError
from fmnist_jax.plots import confusion_matrix, plot_confusion_matrix
from fmnist_jax.steps import cross_entropy


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluate a trained workdir on the Fashion-MNIST test split."""

    workdir: str = dataclasses.field(default="", metadata={
        "help": "the training run's workdir (required)"})
    checkpoint: str = dataclasses.field(default="best", metadata={
        "help": "best (by the run's --monitor), latest, or a step number"})
    data_dir: str = dataclasses.field(default="", metadata={
        "help": "directory with the four .gz files; empty: as for training"})
    batch_size: int = dataclasses.field(default=1000, metadata={
        "help": "images per evaluation batch"})


def evaluate(workdir: str, checkpoint: str = "best", data_dir: str | None = None,
             batch_size: int = 1000) -> dict:
    """Evaluates a checkpoint of ``workdir`` on all 10,000 test images."""
    loaded = load_state(workdir, checkpoint)
    test = load_dataset(data_dir or None, validation_size=0).test
    logits = np.concatenate([
        np.asarray(loaded.predict_logits(test.images[i:i + batch_size]))
        for i in range(0, len(test.labels), batch_size)])
    predictions = logits.argmax(-1)
    loss = float(np.mean(cross_entropy(jax.numpy.asarray(logits), test.labels)))
    matrix = confusion_matrix(test.labels, predictions)
    per_class = matrix.diagonal() / matrix.sum(1)
    return {"workdir": str(workdir), "checkpoint_step": loaded.step,
            "model": loaded.config.model, "test_loss": loss,
            "test_accuracy": float(np.mean(predictions == test.labels)),
            "test_count": int(len(test.labels)),
            "per_class_accuracy": dict(zip(CLASS_NAMES, map(float, per_class))),
            "confusion_matrix": matrix.tolist(), "class_names": list(CLASS_NAMES)}


def format_report(report: dict) -> str:
    names = report["class_names"]
    short = [n.split("/")[0][:7] for n in names]
    lines = [f"{report['workdir']} (checkpoint step {report['checkpoint_step']}, "
             f"{report['model']}): test loss {report['test_loss']:.4f}, accuracy "
             f"{100 * report['test_accuracy']:.2f}% of {report['test_count']} images", "",
             "per class:"]
    lines += [f"  {name:<12} {100 * acc:6.2f}%" for name, acc
              in report["per_class_accuracy"].items()]
    lines += ["", "confusion matrix (rows: true class, columns: predicted):",
              " " * 13 + "".join(f"{s:>8}" for s in short)]
    lines += [f"  {name:<11}" + "".join(f"{v:>8}" for v in row)
              for name, row in zip(short, report["confusion_matrix"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    parser = build_parser(EvalConfig, prog="fmnist-evaluate", presets=False)
    try:
        args = EvalConfig(**vars(parser.parse_args(argv)))
        if not args.workdir:
            raise UserError("--workdir is required: the directory of a training run")
        report = evaluate(args.workdir, args.checkpoint, args.data_dir, args.batch_size)
        out = Path(args.workdir)
        metrics_lib.write_json(out / "eval.json", report)
        plot_confusion_matrix(np.array(report["confusion_matrix"]), report["class_names"],
                              out / "confusion_matrix.png",
                              title=f"{report['model']}: test accuracy "
                                    f"{100 * report['test_accuracy']:.2f}%")
    except UserError as e:
        print(f"fmnist-evaluate: error: {e}", file=sys.stderr)
        return e.exit_code
    print(format_report(report))
    print(f"\nwrote {out / 'eval.json'} and {out / 'confusion_matrix.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
