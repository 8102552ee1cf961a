"""Models written the Flax way, made ready for :func:`fmnist_jax.fit`.

``fit`` trains any ``nnx.Module`` called as ``model(x)`` with its modes set the Flax way
(``model.train()`` / ``model.eval()``), exactly as the Flax NNX tutorials write them; an
``nnx.Module`` whose ``__call__`` takes its mode as an argument (``train``, ``deterministic``,
...: :data:`TRAIN_ARGUMENTS`), as code ported from Linen does (:class:`ModeArgument`); and
any ``flax.linen.Module``, bridged with ``nnx.bridge.ToNNX`` and initialised from a sample
batch (:class:`LinenModel`). What :func:`prepare` does to the model it is given:

- an NNX module is copied (``nnx.clone``): training never touches the caller's object, which
  ``fit`` updates with the trained weights at the end (:func:`give_back`);
- its ``nnx.Conv`` layers (and Linen ``nn.Conv`` ones) run through
  :func:`fmnist_jax.kernels.conv_general_dilated`: XLA's convolution on GPU/TPU, the several
  times faster im2col kernel on XLA:CPU, same parameters and results;
- :func:`check` runs it abstractly on a sample batch, in both modes: a model that does not
  return ``(batch, 10)`` logits is refused with one line before training, and one that
  fails with the error of its own code, traceback included.
"""

from __future__ import annotations

import inspect

import jax
import numpy as np
from flax import linen, nnx

from fmnist_jax.errors import UserError
from fmnist_jax.kernels import conv_general_dilated, use_fast_convolutions

# Names of a ``__call__`` argument that sets the mode, and its value when training.
TRAIN_ARGUMENTS = {"train": True, "training": True, "is_training": True,
                   "deterministic": False, "eval": False, "inference": False,
                   "use_running_average": False}


def prepare(model, sample: np.ndarray, rngs: nnx.Rngs) -> nnx.Module:
    """A training copy of ``model`` (NNX or Linen) with fast convolutions. ``sample``:
    standardised images ``(B, H, W, C)``; ``rngs``: streams for a Linen module's
    parameters and dropout (NNX modules bring their own)."""
    if isinstance(model, linen.Module):
        return LinenModel(model, sample, rngs=rngs)
    if not isinstance(model, nnx.Module):
        raise UserError(f"model must be a flax.nnx.Module or a flax.linen.Module, not "
                        f"{type(model).__name__}")
    work = nnx.clone(model)
    use_fast_convolutions(work)
    argument = _mode_argument(model)
    return work if argument is None else ModeArgument(work, argument)


def give_back(model: nnx.Module, variables: dict) -> None:
    """Puts the run's ``variables`` (``{"params", "rngs", "model_state"}``) into the
    caller's NNX ``model`` (the one given to :func:`prepare`), in eval mode."""
    parts = [variables[k] for k in ("params", "rngs", "model_state")]
    if _mode_argument(model) is not None:  # trained inside a ModeArgument
        parts = [part["module"] if "module" in part else part for part in parts]
    nnx.update(model, *parts)
    model.eval()


def describe(model) -> str:
    """The model's class name, as the logs and summary.json name it."""
    return type(model).__name__


def check(graphdef: nnx.GraphDef, variables: tuple, sample: np.ndarray,
          num_classes: int = 10) -> None:
    """Runs the model abstractly (``jax.eval_shape``) on ``sample`` in training and in
    inference mode: an error of the model's own code propagates with its traceback and a
    note; a model that returns anything but ``(batch, num_classes)`` logits is a one-line
    UserError."""
    for mode in ("train", "eval"):
        def forward(variables, x):
            model = nnx.merge(graphdef, *variables, copy=True)
            getattr(model, mode)()
            return model(x)

        try:
            out = jax.eval_shape(forward, variables, sample)
        except Exception as e:  # the user's own error, with its traceback and a note
            e.add_note(f"fmnist_jax: the model fails on a sample batch of shape "
                       f"{sample.shape} in {mode} mode; fit calls it as model(x) after "
                       "model.train() or model.eval()")
            raise
        shape = getattr(out, "shape", None)
        if shape != (len(sample), num_classes):
            got = f"shape {tuple(shape)}" if shape is not None else type(out).__name__
            raise UserError(f"the model returns {got} for a sample batch of shape "
                            f"{sample.shape}; fit needs logits of shape (batch, "
                            f"{num_classes}) for these images and their {num_classes} "
                            "classes")


class ModeArgument(nnx.Module):
    """An NNX module whose ``__call__`` takes its mode as an argument (``train=``,
    ``deterministic=``, ...), as a model of the Flax conventions: ``model(x)``, with
    ``model.train()`` / ``model.eval()`` setting ``deterministic``, which becomes the
    module's argument."""

    def __init__(self, module: nnx.Module, argument: str):
        self.module = module
        self.argument = argument
        self.deterministic = False  # like a fresh NNX model: in training mode

    def __call__(self, x):
        return self.module(x, **_mode_kwargs(self.argument, not self.deterministic))


class LinenModel(nnx.Module):
    """A Linen module as an NNX model of the Flax conventions: ``model(x)``, with
    ``model.train()`` / ``model.eval()`` setting ``deterministic``, which becomes the
    module's own mode argument (``train``, ``deterministic``, ...: see
    :data:`TRAIN_ARGUMENTS`) when its ``__call__`` takes one. In training mode every
    collection but ``params`` (batch statistics, ...) is mutable. Its convolutions
    (``nn.Conv`` without a kernel of their own) run through
    :func:`fmnist_jax.kernels.conv_general_dilated`."""

    def __init__(self, module: linen.Module, sample, *, rngs: nnx.Rngs):
        self.mode_argument = _mode_argument(module)
        self.deterministic = False  # like a fresh NNX model: in training mode
        self.bridge = nnx.bridge.ToNNX(module, rngs=rngs)
        with linen.intercept_methods(_fast_linen_convolutions):
            nnx.bridge.lazy_init(self.bridge, sample,
                                 **_mode_kwargs(self.mode_argument, training=False))
        self.mutable = tuple(sorted({
            nnx.variable_name_from_type(type(v)) for _, v in nnx.iter_graph(self.bridge)
            if isinstance(v, nnx.Variable) and not isinstance(v, (nnx.Param, nnx.RngState))
        }))


    def __call__(self, x):
        training = not self.deterministic
        with linen.intercept_methods(_fast_linen_convolutions):
            return self.bridge(x, mutable=list(self.mutable) if training else False,
                               **_mode_kwargs(self.mode_argument, training))


def _mode_kwargs(argument: str | None, training: bool) -> dict:
    """The keyword argument that sets a ``__call__``'s mode (none without one)."""
    if argument is None:
        return {}
    return {argument: training if TRAIN_ARGUMENTS[argument] else not training}


def _mode_argument(module) -> str | None:
    """The name of the (NNX or Linen) module's mode argument, None when it has none; a
    UserError when its ``__call__`` needs an argument that fit cannot give."""
    parameters = list(inspect.signature(type(module).__call__).parameters.values())[2:]
    found = [p.name for p in parameters if p.name in TRAIN_ARGUMENTS]
    required = [p.name for p in parameters if p.name not in TRAIN_ARGUMENTS
                and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required or len(found) > 1:
        raise UserError(
            f"{type(module).__name__}.__call__ takes {', '.join(required or found)} besides "
            "the images; fit calls a model as model(x), with at most one of "
            f"{', '.join(TRAIN_ARGUMENTS)} to set the mode: wrap it in a module that does")
    return found[0] if found else None


def _fast_linen_convolutions(next_fun, args, kwargs, context):
    """A Linen method interceptor: ``nn.Conv`` layers that use ``lax``'s convolution get
    :func:`fmnist_jax.kernels.conv_general_dilated` for the call."""
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, linen.Conv)
            or module.conv_general_dilated is not None
            or module.conv_general_dilated_cls is not None):
        return next_fun(*args, **kwargs)
    object.__setattr__(module, "conv_general_dilated", conv_general_dilated)  # frozen field
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "conv_general_dilated", None)
