"""Models written the Flax way, trained by fit: NNX modules of every style, Linen modules,
and the one-line refusals of models fit cannot train."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
from conftest import tiny_dataset
from flax import linen as nn
from flax import nnx

from fmnist_jax import Config, fit, load_model
from fmnist_jax.errors import UserError
from fmnist_jax.kernels import conv_general_dilated

QUICK = dict(epochs=2, batch_size=64, progress=False, steps_per_dispatch=4)


class SmallCNN(nnx.Module):
    """Tutorial style: rngs kept by the layers, __call__(x) alone."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(14 * 14 * 8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.norm(self.conv(x))), (2, 2), (2, 2))
        return self.head(self.dropout(x.reshape(x.shape[0], -1)))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=deterministic)(x)
        x = nn.Dropout(0.2, deterministic=deterministic)(nn.relu(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_tutorial_style_module_trains_and_gets_the_runs_model(tmp_path, capsys):
    net = SmallCNN(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(net, nnx.Param))
    data = tiny_dataset()
    result = fit(Config(**QUICK), model=net, optimizer=optax.adamw(1e-3), data=data,
                 workdir=str(tmp_path))
    assert "SmallCNN (" in capsys.readouterr().out.splitlines()[0]
    assert result.summary["test_accuracy"] > 0.9
    assert (result.summary["model"], result.summary["optimizer"], result.summary["loss"]) == (
        "SmallCNN", "custom", "sparse")
    assert json.loads((tmp_path / "config.json").read_text())["custom"] == {
        "model": "SmallCNN", "optimizer": "custom"}
    # The module passed in now holds the run's model (EMA weights), in eval mode; its own
    # convolution kernel is left as the user wrote it.
    assert not any(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(nnx.state(net, nnx.Param))))
    assert net.dropout.deterministic and net.norm.use_running_average
    assert net.conv.conv_general_dilated is jax.lax.conv_general_dilated
    from fmnist_jax.steps import normalize

    # (statistics: those of the synthetic training split, the run's)
    logits = net(normalize(data.test.images, (result.spec.mean, result.spec.std)))
    np.testing.assert_allclose(logits, result.classifier.logits(data.test.images),
                               rtol=1e-4, atol=1e-4)
    assert result.model.conv.conv_general_dilated is conv_general_dilated  # trained fast
    # Loaded back from the workdir with the module's structure.
    with pytest.raises(UserError, match="trained with a model of your own \\(SmallCNN\\)"):
        load_model(tmp_path)
    loaded = load_model(tmp_path, model=SmallCNN(nnx.Rngs(5)))
    np.testing.assert_array_equal(loaded.logits(data.test.images),
                                  result.classifier.logits(data.test.images))


def test_nnx_sequential_trains():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(lambda x: x.reshape(x.shape[0], -1), nnx.Linear(784, 32, rngs=rngs),
                           nnx.relu, nnx.Dropout(0.1, rngs=rngs), nnx.Linear(32, 10, rngs=rngs))
    result = fit(Config(**QUICK), model=model, data=tiny_dataset())
    assert result.summary["model"] == "Sequential" and result.summary["test_accuracy"] > 0.9


def test_linen_module_with_batch_norm_and_dropout(tmp_path):
    data = tiny_dataset()
    result = fit(Config(**QUICK), model=LinenNet(), data=data, workdir=str(tmp_path))
    assert result.summary["model"] == "LinenNet" and result.summary["test_accuracy"] > 0.9
    stats = [v for _, v in nnx.iter_graph(result.model) if isinstance(v, nnx.BatchStat)]
    assert stats and all(np.abs(np.asarray(v[...])).sum() > 0 for v in stats)  # they moved
    mode = result.model
    mode.train()
    assert not mode.deterministic
    loaded = load_model(tmp_path, model=LinenNet())
    np.testing.assert_array_equal(loaded.logits(data.test.images[:50]),
                                  result.classifier.logits(data.test.images[:50]))


def test_linen_convolutions_take_the_fast_kernel():
    from fmnist_jax.adapt import LinenModel

    x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    model = LinenModel(LinenNet(), x, rngs=nnx.Rngs(params=0, dropout=1))
    model.eval()
    graphdef, state = nnx.split(model)
    text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()
    assert "convolution" not in text  # im2col: slices and a matmul, on this CPU
    plain = nnx.bridge.ToNNX(LinenNet(), rngs=nnx.Rngs(params=0, dropout=1))
    nnx.bridge.lazy_init(plain, x)
    np.testing.assert_allclose(model(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, message", [
    (nnx.Sequential(lambda x: x.reshape(x.shape[0], -1),
                    nnx.Linear(784, 11, rngs=nnx.Rngs(0))),
     "the model returns shape (2, 11) for a sample batch of shape (2, 28, 28, 1); fit needs "
     "logits of shape (batch, 10)"),
    ("not a model", "model must be a flax.nnx.Module or a flax.linen.Module, not str"),
])
def test_models_fit_cannot_train_are_refused_in_one_line(model, message, tmp_path):
    with pytest.raises(UserError) as e:
        fit(Config(**QUICK), model=model, data=tiny_dataset(), workdir=str(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "checkpoints").exists()


class Buggy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.head = nnx.Linear(784, 10, rngs=rngs)

    def __call__(self, x):
        flat = x.reshape(x.shape[0], -1)
        return self.head(flat) * undefined_scale  # noqa: F821 - the user's bug


@pytest.mark.parametrize("model, error, line", [
    (Buggy(nnx.Rngs(0)), NameError, "return self.head(flat) * undefined_scale"),
    (nnx.Sequential(lambda x: x.reshape(x.shape[0], -1), nnx.Dropout(0.5),
                    nnx.Linear(784, 10, rngs=nnx.Rngs(0))), ValueError, None),
])
def test_errors_in_the_models_code_keep_their_traceback(model, error, line, tmp_path):
    """A model whose own code fails reaches the caller as its own error, traceback and
    failing line included, with one note saying what fit was doing."""
    import traceback

    with pytest.raises(error) as e:
        fit(Config(**QUICK), model=model, data=tiny_dataset(), workdir=str(tmp_path))
    assert e.value.__notes__[-1] == (  # (JAX may add one about its filtered frames)
        "fmnist_jax: the model fails on a sample batch of shape (2, 28, 28, 1) in train "
        "mode; fit calls it as model(x) after model.train() or model.eval()")
    if line:
        lines = [frame.line for frame in traceback.extract_tb(e.value.__traceback__)]
        assert any(text.startswith(line) for text in lines), lines
    assert not (tmp_path / "checkpoints").exists()


class PortedFromLinen(nnx.Module):
    """An NNX module that takes its mode as an argument, as Linen code does."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(28 * 28 * 8, 10, rngs=rngs)

    def __call__(self, x, train: bool = False):
        x = nnx.relu(self.norm(self.conv(x), use_running_average=not train))
        return self.head(self.dropout(x.reshape(x.shape[0], -1), deterministic=not train))


def test_nnx_module_with_a_mode_argument_trains_in_training_mode(tmp_path):
    """fit follows the module's own ``train`` argument: batch statistics move, dropout is
    on in training and off in evaluation; the caller's module gets the weights."""
    from fmnist_jax import adapt

    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    work = adapt.prepare(PortedFromLinen(nnx.Rngs(0)), np.asarray(x), nnx.Rngs(0))
    work.train()
    assert not np.array_equal(work(x), work(x))  # dropout draws new masks
    work.eval()
    np.testing.assert_array_equal(work(x), work(x))

    net = PortedFromLinen(nnx.Rngs(0))
    result = fit(Config(**QUICK), model=net, optimizer=optax.adam(1e-3), data=tiny_dataset(),
                 workdir=str(tmp_path))
    assert result.summary["model"] == "PortedFromLinen"
    assert float(np.abs(net.norm.mean[...]).max()) > 0  # statistics moved (were 0)
    np.testing.assert_array_equal(net.norm.mean[...], result.model.module.norm.mean[...])
    loaded = load_model(tmp_path, model=PortedFromLinen(nnx.Rngs(3)))
    np.testing.assert_array_equal(loaded.logits(tiny_dataset().test.images),
                                  result.classifier.logits(tiny_dataset().test.images))


def test_nnx_module_with_an_argument_fit_cannot_give():
    class NeedsMask(nnx.Module):
        def __init__(self, rngs):
            self.head = nnx.Linear(784, 10, rngs=rngs)

        def __call__(self, x, mask, train=False):
            return self.head(x.reshape(x.shape[0], -1) * mask)

    with pytest.raises(UserError, match="NeedsMask.__call__ takes mask besides the images; "
                                        "fit calls a model as model\\(x\\)"):
        fit(Config(**QUICK), model=NeedsMask(nnx.Rngs(0)), data=tiny_dataset())


def test_linen_module_with_an_argument_fit_cannot_give():
    class NeedsMask(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            return nn.Dense(10)(x.reshape(x.shape[0], -1) * mask)

    with pytest.raises(UserError, match="NeedsMask.__call__ takes mask besides the images; "
                                        "fit calls a model as model\\(x\\)"):
        fit(Config(**QUICK), model=NeedsMask(), data=tiny_dataset())
