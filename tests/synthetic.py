"""Runs a fmnist_jax command on a generated IDX data set instead of Fashion-MNIST.

    python tests/synthetic.py DATA_DIR fmnist_jax.train --epochs=1 ...

``DATA_DIR`` holds four IDX files written by ``conftest.write_synthetic_set`` and their
description, ``spec.json`` (names, counts, SHA-256 of the payloads). The command runs in
this process with that description in place of the official one, and with
``FMNIST_DATA_DIR=DATA_DIR``, unless that variable is set to the empty string (then the
files are looked for in the usual places, then downloaded): everything else (finding, checking and reading the files,
the command line, signals, exit status) is the real code path.
"""

import json
import os
import runpy
import sys

from fmnist_jax import data


def use(directory: str) -> None:
    """Makes ``directory``'s generated set the data set of this process."""
    with open(os.path.join(directory, "spec.json")) as f:
        data.FASHION_MNIST = data.DatasetFiles(*(data.IdxFile(**f) for f in json.load(f)))
    if os.environ.get("FMNIST_DATA_DIR") != "":  # set but empty: look around, download
        os.environ["FMNIST_DATA_DIR"] = directory


if __name__ == "__main__":
    directory, module, *args = sys.argv[1:]
    use(directory)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
