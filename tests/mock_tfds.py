"""Runs a fmnist_jax command on tfds's mock ``fashion_mnist`` (no TensorFlow, no download).

    python tests/mock_tfds.py EXAMPLES [--kill_after_step=N] fmnist_jax.train --data_source=tfds ...

``tfds.testing.mock_data(num_examples=EXAMPLES)`` generates the same records in every
process. With ``--kill_after_step=N`` the process kills itself with SIGKILL as soon as the
checkpoint of step N is complete on disk: a crash at a known point, for resume tests.
"""

import os
import runpy
import signal
import sys

import tensorflow_datasets as tfds

from fmnist_jax import checkpoints


def kill_after(step: int) -> None:
    save = checkpoints.Checkpoints.save

    def save_then_die(self, state, meta, metrics=None):
        save(self, state, meta, metrics)
        if int(state.step) >= step:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.Checkpoints.save = save_then_die


if __name__ == "__main__":
    examples, *rest = sys.argv[1:]
    if rest[0].startswith("--kill_after_step="):
        kill_after(int(rest.pop(0).split("=", 1)[1]))
    module, *args = rest
    sys.argv = [module, *args]
    with tfds.testing.mock_data(num_examples=int(examples)):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
