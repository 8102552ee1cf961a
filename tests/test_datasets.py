"""Data sets other than Fashion-MNIST: users' arrays of any image shape and class count,
MNIST-like IDX sets by name, and tfds image-classification data sets."""

from __future__ import annotations

import gzip
import hashlib
import json

import jax
import numpy as np
import pytest
from conftest import idx_bytes, make_images
from flax import nnx

from fmnist_jax import Config, Dataset, fit, load_model
from fmnist_jax import data as data_lib
from fmnist_jax.data import DataSpec
from fmnist_jax.errors import UserError

QUICK = dict(progress=False, eval_batch_size=64, steps_per_dispatch=4, plots=False)


def colour_crops(n: int, seed: int, k: int = 4, shape=(20, 24, 3)):
    """Learnable RGB images: class c is a bright band at rows 4c..4c+5 in channel c % 3."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    images = rng.integers(0, 60, (n, *shape), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 4 * c:4 * c + 5, :, c % shape[-1]] += 150
    return images, labels


def test_from_arrays_infers_shape_classes_and_statistics():
    x, y = colour_crops(300, 0)
    xt, yt = colour_crops(100, 1)
    data = Dataset.from_arrays(x, y, xt, yt, validation_size=50)
    spec = data.spec()
    assert len(data.train.labels) == 250 and len(data.validation.labels) == 50
    assert spec.image_shape == (20, 24, 3) and spec.num_classes == 4
    assert spec.class_names == ("0", "1", "2", "3") and spec.pixels == "uint8"
    expected = (x[50:] / 255.0).reshape(-1, 3)
    np.testing.assert_allclose(spec.mean, expected.mean(0), rtol=1e-9)
    np.testing.assert_allclose(spec.std, expected.std(0), rtol=1e-9)
    # (N, H, W) gets a channel; the class count may come from names; floats stay floats
    gray = Dataset.from_arrays(x[..., 0] / 255.0, y, xt[..., 0] / 255.0, yt,
                               validation_size=0, class_names="abcdef")
    assert gray.spec().image_shape == (20, 24, 1) and gray.spec().num_classes == 6
    assert gray.spec().pixels == "float32" and gray.validation is None
    assert DataSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "x_test": a["x_test"][:, :10]}, "must be the same"),
    (lambda a: {**a, "y_train": -a["y_train"] - 1}, "labels are 0..K-1"),
    (lambda a: {**a, "y_train": np.eye(4)[a["y_train"]]}, "integer labels"),
    (lambda a: {**a, "y_train": a["y_train"] + 0.5}, "integer class indices"),
    (lambda a: {**a, "x_train": a["x_train"][:, 0, 0]}, "must hold images"),
    (lambda a: {**a, "class_names": ("a", "b")}, "class_names has 2 names"),
])
def test_from_arrays_refuses_what_it_cannot_train_on(change, message):
    x, y = colour_crops(60, 0)
    xt, yt = colour_crops(20, 1)
    args = change({"x_train": x, "y_train": y, "x_test": xt, "y_test": yt,
                   "class_names": None})
    with pytest.raises(UserError, match=message):
        Dataset.from_arrays(args.pop("x_train"), args.pop("y_train"), args.pop("x_test"),
                            args.pop("y_test"), validation_size=10, **args)


def test_fit_trains_our_models_on_arrays_of_another_shape(tmp_path):
    x, y = colour_crops(1200, 0)
    xt, yt = colour_crops(200, 1)
    data = Dataset.from_arrays(x, y, xt, yt, validation_size=200,
                               class_names=("north", "east", "south", "west"))
    config = Config(model="cnn", features=(8, 16), dense=32, epochs=3, batch_size=50,
                    **{**QUICK, "plots": True})
    result = fit(config, data=data, workdir=str(tmp_path))
    assert result.summary["test_accuracy"] > 0.9
    assert result.predict(xt[:5]).shape == (5, 4)
    # The spec travels with the run: the workdir's model takes the same images.
    written = json.loads((tmp_path / "config.json").read_text())["data"]
    assert DataSpec.from_dict(written) == data.spec()
    loaded = load_model(tmp_path)
    np.testing.assert_array_equal(loaded.logits(xt), result.classifier.logits(xt))
    assert loaded.evaluate(xt, yt)["accuracy"] == result.summary["test_accuracy"]
    with pytest.raises(UserError, match=r"images must be \(N, 20, 24, 3\)"):
        loaded.logits(np.zeros((2, 28, 28), np.uint8))
    assert (tmp_path / "predictions.png").stat().st_size > 0
    from fmnist_jax.evaluate import evaluate
    with pytest.raises(UserError, match="trained on arrays given to fit"):
        evaluate(str(tmp_path))
    from fmnist_jax.export import export
    exported = export(loaded, ("cpu",))
    assert exported.in_avals[0].shape[1:] == (20, 24, 3)
    np.testing.assert_allclose(np.asarray(exported.call(xt[:7])), loaded.logits(xt[:7]),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", ["mlp", "cnn_seed", "resnet"])
def test_every_named_model_adapts_to_the_shape_and_classes(model):
    x, y = colour_crops(64, 0, k=3, shape=(16, 12, 2))
    data = Dataset.from_arrays(x / 255.0, y, x / 255.0, y, validation_size=0)
    config = Config(model=model, epochs=1, batch_size=16, features=(4, 8), blocks=1, **QUICK)
    result = fit(config, data=data)
    assert result.predict(x[:3] / 255.0).shape == (3, 3)  # floats in their own units


def test_a_users_model_that_does_not_fit_the_classes_is_one_line():
    x, y = colour_crops(64, 0, k=3)

    class TenWay(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(20 * 24 * 3, 10, rngs=rngs)

        def __call__(self, x):
            return self.dense(x.reshape(x.shape[0], -1))

    data = Dataset.from_arrays(x, y, x, y, validation_size=0)
    with pytest.raises(UserError, match=r"logits of shape \(batch, 3\) for these images"):
        fit(Config(epochs=1, batch_size=16, **QUICK), model=TenWay(nnx.Rngs(0)), data=data)


def _mnist_like_dir(directory, n_train=240, n_test=60):
    """Four gzipped IDX files, and the data set (MNIST's names) whose archive digests they
    match."""
    directory.mkdir(parents=True, exist_ok=True)
    digests = []
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = make_images(n, seed)
        for kind, array, idx in (("images", images, 3), ("labels", labels, 1)):
            blob = gzip.compress(idx_bytes(array), mtime=0)
            (directory / f"{prefix}-{kind}-idx{idx}-ubyte.gz").write_bytes(blob)
            digests.append("sha256:" + hashlib.sha256(blob).hexdigest())
    files = [data_lib.IdxFile(f.name, f.kind, n, None, d) for f, n, d in
             zip(data_lib.MNIST.all(), (n_train, n_train, n_test, n_test), digests)]
    import dataclasses
    return dataclasses.replace(data_lib.MNIST, train_images=files[0], train_labels=files[1],
                               test_images=files[2], test_labels=files[3])


def test_dataset_flag_reads_mnist_like_files_checked_by_their_archive_digests(
        tmp_path, monkeypatch):
    files = _mnist_like_dir(tmp_path / "mnist")
    monkeypatch.setitem(data_lib.IDX_DATASETS, "mnist", files)
    monkeypatch.setenv("FMNIST_DATA_DIR", str(tmp_path / "elsewhere"))  # Fashion-MNIST's only
    config = Config(model="mlp", hidden=(32,), dataset="mnist", data_dir=str(tmp_path / "mnist"),
                    validation_size=40, epochs=2, batch_size=20, **QUICK)
    result = fit(config, workdir=str(tmp_path / "run"))
    assert result.spec.name == "mnist" and result.spec.class_names == tuple("0123456789")
    assert result.spec.mean != (data_lib.PIXEL_MEAN,)  # computed, not Fashion-MNIST's
    from fmnist_jax.evaluate import evaluate
    report = evaluate(str(tmp_path / "run"))
    assert report["test_accuracy"] == result.summary["test_accuracy"]
    assert report["class_names"] == list("0123456789")
    # An archive that is not the published one is refused, naming the file.
    blob = (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(gzip.decompress(blob), mtime=1))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz fails its checksum"):
        data_lib.load_dataset(str(tmp_path / "mnist"), 0, dataset="mnist")
    # A decompressed copy is checked by its structure.
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(blob))
    assert len(data_lib.load_dataset(str(tmp_path / "mnist"), 0, dataset="mnist").test.labels) \
        == 60


def test_an_unknown_idx_dataset_is_one_line():
    with pytest.raises(UserError, match="--dataset=cifar10 has no official IDX files"):
        fit(Config(dataset="cifar10", epochs=1, **QUICK))


def test_kmnist_is_known_by_its_published_digests():
    kmnist = data_lib.idx_dataset("kmnist")
    assert kmnist.title == "Kuzushiji-MNIST" and len(kmnist.class_names) == 10
    assert all(f.archive.startswith("md5:") for f in kmnist.all())
    assert all(f.archive.startswith("sha256:") for f in data_lib.MNIST.all())


def test_tfds_image_classification_datasets_by_name(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = Config(model="cnn", features=(4,), dense=8, data_source="tfds", dataset="cifar10",
                    validation_size=16, epochs=1, batch_size=16, whiten=True, **QUICK)
    with tfds.testing.mock_data(num_examples=64):
        result = fit(config, workdir=str(tmp_path))
        assert result.spec.image_shape == (32, 32, 3) and result.spec.num_classes == 10
        assert result.summary["test_count"] == 64
        from fmnist_jax.evaluate import evaluate
        assert evaluate(str(tmp_path))["test_accuracy"] == result.summary["test_accuracy"]
        # The splits as the run read them, for scripts that evaluate a finished run
        from fmnist_jax.input_pipeline import load_split, load_tfds_sources
        validation, test = load_split(config, "validation"), load_split(config, "test")
        train = load_tfds_sources(None, None, "cifar10")["train"]
        assert validation.images.shape == (16, 32, 32, 3) and len(test.labels) == 64
        assert [int(train[i]["label"]) for i in range(16)] == validation.labels.tolist()
        assert np.array_equal(np.stack([train[i]["image"] for i in range(16)]),
                              validation.images)
        # --whiten read the training images that follow the validation split
        from fmnist_jax.build import make_pipeline
        from fmnist_jax.models import whitening_filters
        from fmnist_jax.parallel import setup
        from fmnist_jax.steps import normalize
        pipeline, spec = make_pipeline(config, None, jax.random.key(0), setup())
        sample = pipeline.train_sample(1000)
        assert np.array_equal(sample, np.stack([train[i]["image"] for i in range(16, 64)]))
        filters = whitening_filters(normalize(sample, (spec.mean, spec.std)))
        assert filters.shape == (3, 3, 3, 54)
    assert jax.tree.leaves(result.state.params)[0].ndim >= 1


def test_a_tfds_dataset_that_is_not_prepared_says_how(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(UserError, match=r"tfds has no prepared cifar10 in .*"
                                        r"file_format='array_record'\)\.download_and_prepare"):
        fit(Config(data_source="tfds", dataset="cifar10", data_dir=str(tmp_path), epochs=1,
                   **QUICK))
