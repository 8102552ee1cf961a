"""Which test-time views are worth their time: the accuracy of a run's model on its
validation split with the logits averaged over different sets of translated views.

    python -m fmnist_jax.train --preset=best_cpu --validation_size=5000 --workdir=runs/v
    python experiments/tta_views.py runs/v

Each view is the image translated by (dy, dx) pixels, black entering at the edge, as
``--tta_shift`` makes its 9 views of -1, 0 and +1 pixel (``--tta_shift=2``: 25 views of up
to 2 pixels, what ``--random_crop=2`` trains for); here other sets are compared too. The
time of an evaluation grows with the number of views. Reads the validation split only (the
run must have held one out): choices are made here, not on the test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from fmnist_jax.inference import load_model, read_run
from fmnist_jax.input_pipeline import load_split
from fmnist_jax.steps import tta_views

# Every translation of up to 2 pixels, in the order of tta_views(shift=2); each set below
# is a subset of them.
ALL_25 = list(itertools.product(range(-2, 3), repeat=2))
VIEW_SETS = {
    "one view": [(0, 0)],
    "5, a cross of 1 px": [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)],
    "9, -1..1 px (--tta_shift)": [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)],
    "9, -2, 0, 2 px": [(a, b) for a in (-2, 0, 2) for b in (-2, 0, 2)],
    "13, a diamond of 2 px": [(a, b) for a in range(-2, 3) for b in range(-2, 3)
                              if abs(a) + abs(b) <= 2],
    "25, -2..2 px (--tta_shift=2)": ALL_25,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="a finished run's --workdir, trained with a "
                                        "validation split")
    args = parser.parse_args()
    classifier = load_model(args.workdir)
    config = read_run(Path(args.workdir))[0]
    split = load_split(config, "validation")  # as the run read it
    if split is None:
        raise SystemExit(f"{args.workdir} held out no validation split (--validation_size=0)")
    images, labels = split  # (N, H, W, C), as every Split holds them
    # The run's own evaluation, one view an image, on each translated copy of the split
    plain = dataclasses.replace(classifier, tta_shift=0, tta_flip=False)
    per_view = {offset: plain.logits(np.asarray(view))
                for offset, view in zip(ALL_25, tta_views(jnp.asarray(images), shift=2))}
    print(f"{args.workdir}: validation accuracy ({len(labels)} images) by test-time views")
    for name, views in VIEW_SETS.items():
        accuracy = (sum(per_view[v] for v in views).argmax(1) == labels).mean()
        print(f"  {name:<30}{100 * accuracy:6.2f}%")


if __name__ == "__main__":
    main()
