"""Run by tests/test_parallel.py: the tfds pipeline (tfds's mock ``fashion_mnist``) on a mesh
of 4 CPU devices in an interleaved order, as one process or as one of two processes joined
by jax.distributed (2 devices each, so each process holds rows 0-3 and 8-11, or 4-7 and
12-15, of every batch of 16). Writes to argv[1]: the test split's logits before and after
one epoch of training, the epoch's losses, and which records of the source this process
read while training and while evaluating."""

import json
import sys

import jax
import numpy as np
import optax
import tensorflow_datasets as tfds
from flax import nnx
from jax.sharding import Mesh

from fmnist_jax import parallel
from fmnist_jax.input_pipeline import Streamed, load_tfds_sources
from fmnist_jax.models import create_model
from fmnist_jax.steps import create_train_state, inference_variables, make_loss, make_steps


class Counted:
    """A random-access source that notes every index read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.source[i]


parallel.join()
devices = jax.devices()
assert len(devices) == 4, devices
mesh = parallel.Devices(Mesh(np.array([devices[i] for i in (0, 2, 1, 3)]), ("data",)))
with tfds.testing.mock_data(num_examples=96):
    sources = load_tfds_sources()
sources = {"train": Counted(sources["train"]), "test": Counted(sources["test"])}
pipeline = Streamed(sources, devices=mesh, batch_size=16, eval_batch_size=8,
                    steps_per_dispatch=2, validation_size=16, seed=0, threads=2)
model = create_model("cnn", rngs=nnx.Rngs(0), features=(4, 8), dense=16)
tx = optax.sgd(0.05)
graphdef, state = create_train_state(model, tx, jax.random.key(1))
steps = make_steps(graphdef, tx, make_loss(), replicated=mesh.replicated)
state = mesh.replicate(state)

report = {"process": jax.process_index(), "rows": mesh.local_rows(16).tolist()}
report["logits_before"] = pipeline.evaluate(inference_variables(state), "test", steps).tolist()
report["test_reads"] = sorted(sources["test"].read)
losses = []
for state, metrics, _ in pipeline.train_epoch(state, 1, steps):
    losses += parallel.to_host(metrics["loss"]).tolist()
report["losses"] = losses
report["train_reads"] = sources["train"].read[:]
report["logits_after"] = pipeline.evaluate(inference_variables(state), "test", steps).tolist()
json.dump(report, open(sys.argv[1], "w"))
