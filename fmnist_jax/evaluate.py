"""Evaluate a trained workdir on the test split.

    python -m fmnist_jax.evaluate --workdir=runs/cnn [--step=N | --best]

Evaluates the run's model (:mod:`fmnist_jax.inference`: the weights its summary.json
reports, so the test loss and accuracy are the summary's), or another checkpoint when asked.
Prints which weights, test loss and accuracy, per-class accuracy and the confusion matrix
as a table; writes ``eval.json`` and ``confusion_matrix.png`` into the workdir.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from fmnist_jax import files
from fmnist_jax.cli import build_parser, quiet_library_logs
from fmnist_jax.data import IDX_DATASETS
from fmnist_jax.errors import UserError
from fmnist_jax.inference import load_model, read_run
from fmnist_jax.input_pipeline import load_split
from fmnist_jax.metrics import classification
from fmnist_jax.plots import confusion_matrix, plot_confusion_matrix


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluate a trained workdir on its data set's test split: by default the run's
    model, whose test loss and accuracy are those of its summary.json."""

    workdir: str = dataclasses.field(default="", metadata={
        "help": "the training run's workdir (required)"})
    step: int = dataclasses.field(default=-1, metadata={
        "help": "evaluate the checkpoint of this step instead of the run's model"})
    best: bool = dataclasses.field(default=False, metadata={
        "help": "evaluate the best checkpoint by the run's --monitor instead of the run's "
                "model"})
    data_dir: str = dataclasses.field(default="", metadata={
        "help": "directory with the four .gz files; empty: as for training"})


def evaluate(workdir: str, step: int | None = None, best: bool = False,
             data_dir: str | None = None) -> dict:
    """Evaluates the run's model (or the checkpoint of ``step``, or the best one) of
    ``workdir`` on all 10,000 test images, as the run itself evaluates."""
    classifier = load_model(workdir, step=step, best=best)
    config, _, _, spec = read_run(Path(workdir))
    if spec.name not in IDX_DATASETS and config.data_source != "tfds":
        raise UserError(f"{workdir} trained on arrays given to fit ({spec.name}): evaluate "
                        "it in Python, load_model(workdir).evaluate(x_test, y_test)")
    test = load_split(config, "test", data_dir or None)
    logits = classifier.logits(test.images)
    predictions = logits.argmax(-1)
    scores = classification(logits, test.labels)
    matrix = confusion_matrix(test.labels, predictions, spec.num_classes)
    per_class = matrix.diagonal() / matrix.sum(1)
    return {"workdir": str(workdir), "checkpoint_step": classifier.step,
            "weights": classifier.description, "model": config.model,
            "test_loss": scores["loss"], "test_accuracy": scores["accuracy"],
            "test_count": scores["count"],
            "per_class_accuracy": dict(zip(spec.class_names, map(float, per_class))),
            "confusion_matrix": matrix.tolist(), "class_names": list(spec.class_names)}


def format_report(report: dict) -> str:
    names = report["class_names"]
    short = [n.split("/")[0][:7] for n in names]
    lines = [f"{report['workdir']}: {report['weights']}, {report['model']}",
             f"test loss {report['test_loss']:.4f}, accuracy "
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
        report = evaluate(args.workdir, None if args.step < 0 else args.step, args.best,
                          args.data_dir)
        out = Path(args.workdir)
        files.write_json(out / "eval.json", report)
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
