"""Runs a fmnist_jax command on a generated IDX data set instead of Fashion-MNIST.

    python tests/synthetic.py DATA_DIR fmnist_jax.train --epochs=1 ...
    python tests/synthetic.py DATA_DIR experiments/tta_views.py WORKDIR

``DATA_DIR`` holds four IDX files written by ``conftest.write_synthetic_set`` and their
description, ``spec.json`` (names, counts, SHA-256 of the payloads). The command runs in
this process with that description in place of the official one, and with
``FMNIST_DATA_DIR=DATA_DIR``, unless that variable is set to the empty string (then the
files are looked for in the usual places, then downloaded): everything else (finding, checking and reading the files,
the command line, signals, exit status) is the real code path.
``FMNIST_TEST_SIGTERM_AT_STEP=N`` makes the process signal itself once it saves a checkpoint
of step N or later.
"""

import dataclasses
import json
import os
import runpy
import sys

from fmnist_jax import data


def use(directory: str) -> None:
    """Makes ``directory``'s generated set the data set of this process."""
    with open(os.path.join(directory, "spec.json")) as f:
        files = [data.IdxFile(**f) for f in json.load(f)]
    # Fashion-MNIST's everything else (name, classes, pixel statistics), these files
    data.FASHION_MNIST = dataclasses.replace(data.FASHION_MNIST, **dict(zip(data.FILE_FIELDS,
                                                                           files)))
    data.IDX_DATASETS["fashion_mnist"] = data.FASHION_MNIST
    if os.environ.get("FMNIST_DATA_DIR") != "":  # set but empty: look around, download
        os.environ["FMNIST_DATA_DIR"] = directory


def sigterm_at_step(step: int) -> None:
    """This process sends itself SIGTERM when it saves a checkpoint of ``step`` or later
    (as a preempted host of a multi-host run would be signalled)."""
    import signal

    from fmnist_jax import checkpoints

    save = checkpoints.Checkpoints.save
    sent = []

    def save_then_signal(self, state, meta, metrics=None):
        save(self, state, meta, metrics)
        if int(state.step) >= step and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))

    checkpoints.Checkpoints.save = save_then_signal


if __name__ == "__main__":
    directory, module, *args = sys.argv[1:]
    use(directory)
    if os.environ.get("FMNIST_TEST_SIGTERM_AT_STEP"):
        sigterm_at_step(int(os.environ["FMNIST_TEST_SIGTERM_AT_STEP"]))
    sys.argv = [module, *args]
    if module.endswith(".py"):  # a script, as experiments/tta_views.py
        runpy.run_path(module, run_name="__main__")
    else:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
