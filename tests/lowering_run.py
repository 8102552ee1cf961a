"""Run by tests/test_backends.py in a subprocess with 8 CPU devices: lowers the train step
and the eval step of every model for cpu, cuda and tpu (jax.export, no hardware needed), in
float32 and bfloat16, on one device and on an 8-device mesh, and writes what the programs
contain as JSON to argv[1]."""

import json
import re
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fmnist_jax import models, parallel
from fmnist_jax.steps import create_train_state, inference_variables, make_loss, make_steps

MODELS = {"mlp": {}, "cnn": {}, "cnn_seed": {}, "resnet": dict(features=(16, 32), blocks=1)}


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)


def contents(text: str) -> dict:
    """What a lowered program holds: native convolutions and pooling, im2col's patches (the
    kernel's rows stacked: a concatenate into (N, Ho, Wo, kh, kw, C)), the operand types of
    every convolution and matmul, loops, sharding annotations, jax.checkpoint's
    optimization barriers."""
    concats = re.findall(r"stablehlo\.concatenate [^\n]*-> tensor<([0-9x]*)[a-z]", text)
    operands = re.findall(r"stablehlo\.(?:convolution|dot_general)[^\n]*: \(tensor<[0-9x]*x?"
                          r"([a-z0-9]+)>, tensor<[0-9x]*x?([a-z0-9]+)>\)", text)
    return {"convolutions": text.count("stablehlo.convolution"),
            "matmuls": text.count("stablehlo.dot_general"),
            "operand_types": sorted({"/".join(pair) for pair in operands}),
            "typed_operations": len(operands),
            "reduce_window": text.count("stablehlo.reduce_window"),
            "patch_stacks": sum(shape.count("x") == 6 for shape in concats),
            "while": text.count("stablehlo.while"),
            "barriers": text.count("stablehlo.optimization_barrier"),
            "sharded": bool(re.search(r"\b(mhlo|sdy)\.sharding", text))}


def lower(name: str, dtype, devices) -> list[dict]:
    tx = optax.adam(1e-3)
    model = models.create_model(name, rngs=nnx.Rngs(params=0, dropout=1), dtype=dtype,
                                **MODELS[name])
    graphdef, state = create_train_state(model, tx, jax.random.key(0), ema=True)
    replicated = devices.replicated if devices else None
    steps = make_steps(graphdef, tx, make_loss(), replicated=replicated)
    batch_sharding = devices.sharded() if devices else None
    if devices:
        state = devices.replicate(state)
    batch = {"image": jax.ShapeDtypeStruct((64, 28, 28, 1), jnp.uint8, sharding=batch_sharding),
             "label": jax.ShapeDtypeStruct((64,), jnp.int32, sharding=batch_sharding)}
    images = jax.ShapeDtypeStruct((2, 64, 28, 28, 1), jnp.uint8,
                                  sharding=devices.sharded(axis=1) if devices else None)
    rows = []
    for platform in ("cpu", "cuda", "tpu"):
        train = jax.export.export(steps.train_step, platforms=[platform])(abstract(state), batch)
        evaluate = jax.export.export(steps.eval_batches, platforms=[platform])(
            abstract(inference_variables(state)), images)
        state_out = train.out_avals[:len(jax.tree.leaves(state))]
        rows.append({"model": name, "dtype": jnp.dtype(dtype).name, "platform": platform,
                     "devices": train.nr_devices,
                     "train": contents(train.mlir_module()),
                     "eval": contents(evaluate.mlir_module()),
                     "state_dtypes": sorted({str(a.dtype) for a in state_out}),
                     "logits": str(evaluate.out_avals[0])})
    return rows


report = []
mesh = parallel.setup()
assert mesh.count == 8, mesh.count
for name in MODELS:
    for dtype in (jnp.float32, jnp.bfloat16):
        for devices in (None, mesh):
            report += lower(name, dtype, devices)
json.dump(report, open(sys.argv[1], "w"))
