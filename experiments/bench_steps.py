"""Milliseconds per training step, model by model, on this machine's default JAX backend.

    python experiments/bench_steps.py                       # every model below
    python experiments/bench_steps.py --only=tutorial_cnn,tutorial_cnn_flax_conv

Each model trains through ``fmnist_jax.steps`` exactly as ``fit`` runs it (a jitted scan of
``--steps`` steps per call, Adam, batch ``--batch_size`` of random images); the figure is
the median over ``--repeats`` calls after one warm-up call, divided by the steps. Models:
ours (``mlp``, ``cnn``, ``cnn_seed``, ``cnn_wide``, ``resnet_small``; ``resnet``, the
preset's, only when named), computing in ``--dtype``, and the users' models
of README.md's "As a library" as ``fit`` prepares them (``tutorial_cnn``, ``linen_cnn``,
``sequential``) or left with Flax's own convolution (``*_flax_conv``). Writes JSON with
``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fmnist_jax import models
from fmnist_jax.steps import create_train_state, make_loss, make_steps, normalize

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_models() -> dict:
    """The names defined by README.md's block of user models (``class TutorialCNN``...)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict = {}
    exec(next(b for b in blocks if "class TutorialCNN" in b), namespace)  # noqa: S102
    return namespace


OURS = {"mlp": {}, "cnn": {}, "cnn_seed": {},
        "cnn_wide": dict(features=(48, 96, 192), dense=384),
        "resnet_small": dict(features=(32, 64, 128), blocks=1),
        "resnet": dict(features=(64, 128, 256), blocks=2)}


def _model(name: str, dtype: str = "float32"):
    rngs = nnx.Rngs(params=0, dropout=1)
    sample = normalize(np.zeros((2, 28, 28, 1), np.uint8))
    if name in OURS:
        base = "resnet" if name.startswith("resnet") else name.replace("_wide", "")
        return models.create_model(base, rngs=rngs, dtype=dtype, **OURS[name])
    flax_conv = name.endswith("_flax_conv")
    user_models = readme_models()
    user = {"tutorial_cnn": lambda: user_models["TutorialCNN"](rngs=rngs),
            "sequential": lambda: user_models["sequential_mlp"](rngs),
            "linen_cnn": user_models["LinenCNN"]}[name.removesuffix("_flax_conv")]()
    if flax_conv and isinstance(user, nnx.Module):
        return user  # as the user wrote it: lax.conv_general_dilated
    if flax_conv:  # a Linen module bridged without our interceptor
        model = nnx.bridge.ToNNX(user, rngs=rngs)
        nnx.bridge.lazy_init(model, sample)
        return _TrainArgument(model)
    from fmnist_jax import adapt

    return adapt.prepare(user, sample, rngs)


class _TrainArgument(nnx.Module):
    """A bridged Linen module called with ``train=`` (no fast convolutions)."""

    def __init__(self, bridge):
        self.bridge, self.deterministic = bridge, False

    def __call__(self, x):
        train = not self.deterministic
        return self.bridge(x, train=train, mutable=["batch_stats"] if train else False)


def time_steps(name: str, batch_size: int, steps: int, repeats: int,
               dtype: str = "float32") -> dict:
    tx = optax.adam(1e-3)
    graphdef, state = create_train_state(_model(name, dtype), tx, jax.random.key(0))
    fns = make_steps(graphdef, tx, make_loss())
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (4096, 28, 28, 1), np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, 4096).astype(np.int32))
    indices = jnp.asarray(rng.integers(0, 4096, (steps, batch_size)).astype(np.int32))
    start = time.perf_counter()
    state, sums = fns.train_scan(state, images, labels, indices)
    jax.block_until_ready(sums)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, sums = fns.train_scan(state, images, labels, indices)
        jax.block_until_ready(sums)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return {"model": name, "dtype": dtype, "ms_per_step": statistics.median(times),
            "min": min(times), "max": max(times), "first_call_s": first,
            "batch_size": batch_size,
            "params": sum(x.size for x in jax.tree.leaves(state.params))}


ALL = ("mlp", "cnn", "cnn_seed", "cnn_wide", "resnet_small", "sequential", "tutorial_cnn",
       "tutorial_cnn_flax_conv", "linen_cnn", "linen_cnn_flax_conv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(ALL))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="our models' computation dtype (parameters stay float32)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    names = args.only.split(",")
    theirs = [n for n in names if n not in OURS]
    if args.dtype != "float32" and theirs:
        parser.error(f"--dtype={args.dtype} applies to our models only, not {theirs}")
    rows = []
    for name in names:
        row = time_steps(name, args.batch_size, args.steps, args.repeats, args.dtype)
        rows.append(row)
        print(f"{name:<24}{row['ms_per_step']:>9.2f} ms/step  ({row['min']:.2f}-"
              f"{row['max']:.2f}; first call {row['first_call_s']:.1f} s; "
              f"{row['params']:,} params)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"backend": jax.default_backend(),
                                              "devices": str(jax.devices()), "rows": rows},
                                             indent=2))


if __name__ == "__main__":
    main()
