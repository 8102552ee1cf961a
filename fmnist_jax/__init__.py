"""fmnist_jax: train small vision models on Fashion-MNIST with JAX, Flax NNX and Optax.

The pieces, one module each: :mod:`~fmnist_jax.data` (the IDX files),
:mod:`~fmnist_jax.input_pipeline` (batches), :mod:`~fmnist_jax.models`,
:mod:`~fmnist_jax.kernels` (convolution and pooling per platform),
:mod:`~fmnist_jax.adapt` (users' NNX and Linen models), :mod:`~fmnist_jax.optim`,
:mod:`~fmnist_jax.steps` (pure jitted steps), :mod:`~fmnist_jax.inference` (the run's
model), :mod:`~fmnist_jax.files`,
:mod:`~fmnist_jax.train` (the run), :mod:`~fmnist_jax.callbacks` (yours, during
``fit``), :mod:`~fmnist_jax.checkpoints`,
:mod:`~fmnist_jax.parallel` (devices), :mod:`~fmnist_jax.plots`,
:mod:`~fmnist_jax.evaluate`, :mod:`~fmnist_jax.predict`, :mod:`~fmnist_jax.config` and
:mod:`~fmnist_jax.cli`.
"""

from fmnist_jax.callbacks import StopTraining
from fmnist_jax.config import PRESETS, Config, preset
from fmnist_jax.data import CLASS_NAMES, Dataset, Split, load_dataset
from fmnist_jax.errors import UserError
from fmnist_jax.kernels import conv_general_dilated, max_pool_2x2
from fmnist_jax.models import CNN, MLP, CNNSeed, Conv, ResNet, count_params, create_model
from fmnist_jax.optim import make_optimizer, make_schedule
from fmnist_jax.steps import (TrainState, create_train_state, cross_entropy, eval_step,
                              make_steps, train_step)

__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily so that ``python -m fmnist_jax.train`` runs the module only once.
    if name in ("Result", "fit", "train_and_evaluate"):
        from fmnist_jax import train

        return getattr(train, name)
    if name in ("Classifier", "load_model"):
        from fmnist_jax import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'fmnist_jax' has no attribute {name!r}")

__all__ = [
    "CLASS_NAMES", "CNN", "CNNSeed", "Classifier", "Config", "Conv", "Dataset", "MLP",
    "PRESETS", "ResNet", "Result", "Split", "StopTraining", "TrainState", "UserError", "conv_general_dilated",
    "count_params", "create_model", "create_train_state", "cross_entropy", "eval_step", "fit",
    "load_dataset", "load_model", "make_optimizer", "make_schedule", "make_steps",
    "max_pool_2x2", "preset", "train_and_evaluate", "train_step",
]
