"""Classify images with a trained workdir.

    python -m fmnist_jax.predict --workdir=runs/cnn shoe.png shirt.jpg
    python -m fmnist_jax.predict --workdir=runs/cnn --test_index=0 --test_index=17

Library: ``model = load_model(workdir)`` (the run's model, :mod:`fmnist_jax.inference`) then
``model.predict(images) -> probabilities``.

How a picture becomes an input of the run's model (:func:`image_to_input`; Fashion-MNIST's
28x28 grayscale, or the run's own ``(H, W, C)`` for another data set):

1. It must be a PNG, JPEG or another format Pillow reads, at most 4096 px on a side and
   not empty; anything else is refused with a message.
2. Transparency is flattened onto white; colour becomes grayscale (ITU-R 601-2 luma) for
   a one-channel run, RGB for a three-channel one.
3. Fashion-MNIST shows light garments on a black background: when a grayscale image's
   border is mostly light (mean above 127, as in a product photo on white), it is inverted.
4. A non-square image is padded to a square with black, centred; then it is resized to
   the run's H x W (Lanczos). A 28x28 grayscale image with a dark border passes unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from fmnist_jax.cli import _Parser, output_pipe_closed, quiet_library_logs
from fmnist_jax.data import IDX_DATASETS, DataSpec
from fmnist_jax.errors import UserError
from fmnist_jax.inference import Classifier, load_model, read_run
from fmnist_jax.input_pipeline import load_split

MAX_SIDE = 4096


def predict(model: Classifier, images) -> np.ndarray:
    """Class probabilities ``(N, 10)`` for uint8 (or 0-255) images ``(N, 28, 28[, 1])``:
    ``model.predict(images)``."""
    return model.predict(images)


def image_to_input(path: str | os.PathLike, spec: DataSpec = DataSpec()) -> np.ndarray:
    """Reads one picture and converts it by the module's rules into uint8 ``(H, W)`` (one
    channel) or ``(H, W, 3)`` (colour) for a run on images of ``spec``."""
    if spec.pixels != "uint8" or spec.image_shape[-1] not in (1, 3):
        raise UserError(f"this run trained on {spec.pixels} images of shape "
                        f"{spec.image_shape}: image files can't be converted for it; use "
                        "load_model(workdir).predict(images) in Python")
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an image")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty")
    try:
        with Image.open(path) as img:
            if max(img.size) > MAX_SIDE:
                raise UserError(f"{path} is {img.size[0]}x{img.size[1]} px, larger than "
                                f"{MAX_SIDE} px on a side; resize it first")
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and
                                                    "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGBA", rgba.size, "white")
                img.alpha_composite(rgba)
            colour = spec.image_shape[-1] == 3
            gray = np.asarray(img.convert("RGB" if colour else "L"), np.uint8)
    except UserError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UserError(f"{path} is not an image Pillow can read ({type(e).__name__})")
    except OSError as e:
        raise UserError(f"{path} cannot be read as an image ({e})")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if not colour and border.mean() > 127:  # light on black, as the IDX data sets
        gray = 255 - gray
    h, w = gray.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, *gray.shape[2:]), np.uint8)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = gray
    height, width = spec.image_shape[:2]
    if square.shape[:2] == (height, width):
        return square
    return np.asarray(Image.fromarray(square).resize((width, height), Image.LANCZOS),
                      np.uint8)


def _parser() -> _Parser:
    parser = _Parser(prog="fmnist-predict", description="Classify 28x28 grayscale images "
                     "(others are converted; see the module docstring) with a trained run.")
    parser.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--workdir", required=True, help="the training run's workdir")
    parser.add_argument("--step", type=int, default=None,
                        help="use the checkpoint of this step instead of the run's model")
    parser.add_argument("--best", action="store_true",
                        help="use the best checkpoint by the run's --monitor instead of the "
                             "run's model")
    parser.add_argument("--test_index", type=int, action="append", default=[],
                        help="classify test image N (repeatable)")
    parser.add_argument("--data_dir", default="", help="the run's data set files, for "
                        "--test_index (empty: as for training)")
    parser.add_argument("--top", type=int, default=1, help="classes shown per image")
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    args = _parser().parse_args(argv)
    try:
        if not args.images and not args.test_index:
            raise UserError("give image files and/or --test_index=N")
        names, inputs, truth = [], [], []
        model = load_model(args.workdir, step=args.step, best=args.best)
        spec = model.spec
        for path in args.images:
            inputs.append(image_to_input(path, spec).reshape(spec.image_shape))
            names.append(path)
            truth.append(None)
        if args.test_index:
            config = read_run(Path(args.workdir))[0]
            if spec.name not in IDX_DATASETS and config.data_source != "tfds":
                raise UserError(f"--test_index: {args.workdir} trained on arrays given to "
                                "fit, which the command line cannot load")
            test = load_split(config, "test", args.data_dir or None)
            for i in args.test_index:
                if not 0 <= i < len(test.labels):
                    raise UserError(f"--test_index={i} must be in [0, {len(test.labels)})")
                inputs.append(test.images[i])
                names.append(f"test[{i}]")
                truth.append(spec.class_names[test.labels[i]])
        probs = model.predict(np.stack(inputs))
    except UserError as e:
        print(f"fmnist-predict: error: {e}", file=sys.stderr)
        return e.exit_code
    try:
        for name, p, true in zip(names, probs, truth):
            top = np.argsort(-p)[:max(args.top, 1)]
            guesses = ", ".join(f"{spec.class_names[k]} {100 * p[k]:.1f}%" for k in top)
            suffix = "" if true is None else f"  (true: {true})"
            print(f"{name}: {guesses}{suffix}", flush=True)
    except BrokenPipeError:  # ``fmnist-predict ... | head``: the reader has what it wanted
        return output_pipe_closed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
