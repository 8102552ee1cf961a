"""What an ensemble of finished runs is worth: the accuracy of the class probabilities
averaged over K of the runs' models, for every K, on their validation split.

    for s in 0 1 2 3 4 5; do
      python -m fmnist_jax.train --preset=best_cpu --validation_size=5000 --seed=$s \\
          --workdir=runs/e$s
    done
    python experiments/ensemble.py runs/e0 runs/e1 runs/e2 runs/e3 runs/e4 runs/e5

Each model classifies as its run evaluates (with the run's test-time views); the softmax
probabilities of K models are averaged. For each K the accuracy is given over every subset
of K runs: mean, lowest and highest. The runs must hold out the same validation split (the
first ``--validation_size`` training images). ``--split=test`` reads the test split
instead, once the choices are made.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import jax
import numpy as np

from fmnist_jax.inference import load_model, read_run
from fmnist_jax.input_pipeline import load_split


def accuracy_by_size(probabilities: np.ndarray, labels: np.ndarray) -> dict[int, list[float]]:
    """For K = 1 to M, the accuracies of the averaged ``probabilities`` ``(M, N, classes)``
    of every subset of K members, in the order of ``itertools.combinations``."""
    members = len(probabilities)
    return {k: [float((probabilities[list(subset)].mean(0).argmax(1) == labels).mean())
                for subset in itertools.combinations(range(members), k)]
            for k in range(1, members + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="finished runs' --workdir")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--out", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    configs = [read_run(Path(w))[0] for w in args.workdirs]
    held_out = {(c.dataset, c.validation_size) for c in configs}
    if len(held_out) > 1:
        raise SystemExit(f"the runs hold out different splits (data set, --validation_size): "
                         f"{sorted(held_out)}")
    split = load_split(configs[0], args.split)  # as the runs read it
    if split is None:
        raise SystemExit(f"{args.workdirs[0]} held out no validation split "
                         "(--validation_size=0)")
    images, labels = split
    probabilities = np.stack([np.asarray(jax.nn.softmax(load_model(w).logits(images), -1))
                              for w in args.workdirs])
    by_size = accuracy_by_size(probabilities, labels)
    print(f"{args.split} accuracy ({len(labels)} images) of K averaged models")
    for w, accuracy in zip(args.workdirs, by_size[1]):
        print(f"  {w}: {100 * accuracy:.2f}%")
    for k, accuracies in by_size.items():
        print(f"  K={k}: mean {100 * np.mean(accuracies):.2f}%, lowest "
              f"{100 * min(accuracies):.2f}%, highest {100 * max(accuracies):.2f}% "
              f"({len(accuracies)} subsets)")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"split": args.split, "images": len(labels), "workdirs": args.workdirs,
             "accuracy_by_size": {str(k): v for k, v in by_size.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
