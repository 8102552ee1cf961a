"""Run by tests/test_parallel.py in a subprocess (the device count is fixed per process).

Writes a JSON report to argv[1]: ten training steps' parameters, an evaluation (sharded over
the devices, and image by image on one device), a two-epoch run with its compilation counts,
and the error for a batch size that does not divide. The data is the generated set of
conftest.py (3,000 training images, 500 of them for validation, 1,000 test images).
"""

import json
import sys

import jax
import numpy as np
import optax
from flax import nnx

from fmnist_jax.metrics import classification
from fmnist_jax.report import Reporter
from conftest import SYNTHETIC_TEST, SYNTHETIC_TRAIN, SYNTHETIC_VAL, make_images
from fmnist_jax import Classifier, Config, UserError, fit, parallel
from fmnist_jax.data import Dataset, Split, split_validation
from fmnist_jax.input_pipeline import DeviceResident
from fmnist_jax.models import create_model
from fmnist_jax.steps import create_train_state, inference_variables, make_loss, make_steps


def _split(n: int, seed: int) -> Split:
    images, labels = make_images(n, seed)
    return Split(images[..., None], labels.astype(np.int32))


report = {"devices": jax.device_count()}
train, validation = split_validation(_split(SYNTHETIC_TRAIN, 0), SYNTHETIC_VAL)
data = Dataset(train, validation, _split(SYNTHETIC_TEST, 1), source="generated")

# Ten steps with dropout and batch norm, and an evaluation: the same numbers up to float
# rounding, whatever the number of devices.
devices = parallel.setup()
pipeline = DeviceResident(data.train, {"validation": data.validation}, devices=devices,
                          batch_size=128, eval_batch_size=1000, steps_per_dispatch=1,
                          seed=[5])
tx = optax.sgd(0.05)  # Adam would turn float noise in zero gradients into +-lr steps
graphdef, state = create_train_state(create_model("cnn", rngs=nnx.Rngs(0), features=(8, 16)),
                                     tx, jax.random.key(1))
steps = make_steps(graphdef, tx, make_loss(), replicated=devices.replicated)
state = devices.replicate(state)
for i, (state, _, _) in enumerate(pipeline.train_epoch(state, 1, steps)):
    if i == 9:
        break
report["params_after_10_steps"] = np.concatenate(
    [np.asarray(x).ravel() for x in jax.tree.leaves(state.params)]).tolist()
variables = inference_variables(state)
logits = pipeline.evaluate(variables, "validation", steps)
report["eval"] = classification(logits, data.validation.labels)
# The same weights on one device, one image at a time: the same logits.
single = Classifier(graphdef, jax.device_get(variables), batch_size=1)
report["eval_vs_one_by_one"] = float(np.abs(logits - single.logits(
    data.validation.images)).max())

# A whole run, counting compilations after the first epoch.
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: compiles.append(name)
    if name == "/jax/core/compile/backend_compile_duration" else None)
marks = []
after_epoch = Reporter.after_epoch
Reporter.after_epoch = lambda self, event: (marks.append(len(compiles)),
                                            after_epoch(self, event))
result = fit(Config(model="mlp", epochs=2, eval_batch_size=99, progress=False), data=data)
report["compiles_at_epoch_ends"] = list(marks)
report["history"] = result.history
report["summary"] = result.summary

try:
    fit(Config(model="mlp", epochs=1, batch_size=100, progress=False), data=data)
except UserError as e:
    report["batch_error"] = str(e)
json.dump(report, open(sys.argv[1], "w"))
