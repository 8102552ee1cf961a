"""Export the run's model as a ``jax.export`` artifact that plain JAX can run.

    python -m fmnist_jax.export --workdir=runs/cnn --output=cnn.jax --platforms=cpu,cuda,tpu

The artifact maps images of the run's data, for any N, to float32 logits ``(N, K)``
(Fashion-MNIST: uint8 ``(N, 28, 28, 1)`` to ``(N, 10)``; a run on float arrays takes
float32): the run's model (the weights its summary's test accuracy was measured with,
:mod:`fmnist_jax.inference`), normalisation included, its weights embedded. One artifact
serves every platform asked for: each runs its own kernels (``fmnist_jax.kernels`` chooses
when the program is lowered). To use it, nothing of fmnist_jax is needed::

    import jax
    exported = jax.export.deserialize(open("cnn.jax", "rb").read())
    logits = exported.call(images)     # uint8 (N, 28, 28, 1) -> float32 (N, 10)

Inside, images go through the same batched program as the run's own evaluations (batches
of the run's ``--eval_batch_size``, the last one padded), so its test accuracy is the
run's.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp

from fmnist_jax import files
from fmnist_jax.cli import build_parser, quiet_library_logs
from fmnist_jax.errors import UserError
from fmnist_jax.inference import Classifier, load_model
from fmnist_jax.steps import eval_batches

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Export the run's model of a workdir as a jax.export artifact (uint8 images (N, H, W,
    C) to float32 logits (N, K); Fashion-MNIST: (N, 28, 28, 1) to (N, 10)), for plain JAX on
    CPU, GPU or TPU."""

    workdir: str = dataclasses.field(default="", metadata={
        "help": "the training run's workdir (required)"})
    output: str = dataclasses.field(default="", metadata={
        "help": "the artifact's file (default: WORKDIR/model.jax)"})
    platforms: str = dataclasses.field(default="cpu,cuda,tpu", metadata={
        "help": "comma-separated platforms the artifact runs on: cpu, cuda, rocm, tpu"})
    step: int = dataclasses.field(default=-1, metadata={
        "help": "export the checkpoint of this step instead of the run's model"})
    best: bool = dataclasses.field(default=False, metadata={
        "help": "export the best checkpoint by the run's --monitor instead"})


def export(classifier: Classifier, platforms: tuple[str, ...]) -> jax.export.Exported:
    """The classifier's forward pass, weights embedded, as a ``jax.export`` program with a
    symbolic batch size."""
    size, graphdef, spec = classifier.batch_size, classifier.graphdef, classifier.spec
    variables = jax.tree.map(jnp.asarray, classifier.variables)

    def logits(images):
        n = images.shape[0]
        batches = (n + size - 1) // size  # symbolic: the last batch padded, as the run does
        padded = jnp.pad(images, ((0, batches * size - n), (0, 0), (0, 0), (0, 0)))
        out = eval_batches(variables, padded.reshape((batches, size, *spec.image_shape)),
                           graphdef=graphdef, tta_flip=classifier.tta_flip,
                           tta_shift=classifier.tta_shift, statistics=(spec.mean, spec.std))
        return out.reshape(batches * size, out.shape[-1])[:n]

    n, = jax.export.symbolic_shape("n")
    return jax.export.export(jax.jit(logits), platforms=platforms)(
        jax.ShapeDtypeStruct((n, *spec.image_shape), input_dtype(spec)))


def input_dtype(spec) -> jnp.dtype:
    """The artifact's input dtype: uint8, or float32 for a run on float images."""
    return jnp.dtype(jnp.uint8 if spec.pixels == "uint8" else jnp.float32)


def _platforms(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in PLATFORMS]
    if not names or unknown:
        raise UserError(f"--platforms={text}: give some of {', '.join(PLATFORMS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    parser = build_parser(ExportConfig, prog="fmnist-export", presets=False)
    try:
        args = ExportConfig(**vars(parser.parse_args(argv)))
        if not args.workdir:
            raise UserError("--workdir is required: the directory of a training run")
        platforms = _platforms(args.platforms)
        classifier = load_model(args.workdir, step=None if args.step < 0 else args.step,
                                best=args.best)
        blob = export(classifier, platforms).serialize()
        output = args.output or f"{args.workdir}/model.jax"
        with files.atomic_open(output, "wb") as f:
            f.write(blob)
    except UserError as e:
        print(f"fmnist-export: error: {e}", file=sys.stderr)
        return e.exit_code
    spec = classifier.spec
    print(f"wrote {output} ({len(blob) / 1e6:.1f} MB): {classifier.description}, for "
          f"{', '.join(platforms)}; {input_dtype(spec).name} images (N, "
          f"{', '.join(map(str, spec.image_shape))}) -> float32 logits (N, {spec.num_classes}) "
          "with jax.export.deserialize(open(FILE, 'rb').read()).call(images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
