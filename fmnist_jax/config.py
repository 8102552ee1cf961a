"""The one configuration of a training run, and the named presets.

Every field is a command-line flag of ``fmnist-train`` (``--name=value``); its ``help`` is
what ``--help`` prints. Defaults are the defaults of ``python -m fmnist_jax.train``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

from fmnist_jax.errors import UserError
from fmnist_jax.models import MODELS
from fmnist_jax.optim import OPTIMIZERS, SCHEDULES
from fmnist_jax.steps import LOSSES

DATA_SOURCES = ("idx", "tfds")
# The fields whose best value depends on the hardware, in one place; 0 in a Config means
# "this table's value for the backend the run is on". On a CPU, small evaluation steps keep
# the convolutions' patches in cache, so 25 images per step evaluate the CNNs faster than
# 100 or 1,000, the MLPs about as fast (figures in experiments/README.md). An accelerator
# wants large batches.
BACKEND_DEFAULTS = {
    "cpu": {"eval_batch_size": 25},
    "gpu": {"eval_batch_size": 1000},
    "tpu": {"eval_batch_size": 1000},
}
MONITORS = ("val_accuracy", "val_loss")
# What earlier versions wrote for "unset" in config.json and checkpoints.
_OLD_SENTINELS = {"dropout": -1.0, "eval_batch_size": 0, "steps_per_dispatch": 0}
DTYPES = ("float32", "bfloat16")


def monitor_sign(monitor: str) -> float:
    """+1 when a larger ``monitor`` value is better (accuracy), -1 when smaller is (loss)."""
    return -1.0 if monitor == "val_loss" else 1.0


def _f(default, help: str, choices=None, *, resumable: bool = False,
       architecture: bool = False, bare=None):
    """A field: its default, ``--help`` text and choices; ``resumable``: a resumed run may
    change it (it changes nothing that is computed); ``architecture``: it decides the
    shapes of the parameters; ``bare``: the value of the flag given without one (as
    ``--tta_shift`` for 1 pixel), which also gets a ``--no`` form for 0."""
    return field(default=default, metadata={"help": help, "choices": choices,
                                            "resumable": resumable,
                                            "architecture": architecture, "bare": bare})


@dataclasses.dataclass(frozen=True)
class Config:
    """A training run. Defaults: our CNN with Adam and a warm-up cosine schedule."""

    # What to train.
    model: str = _f("cnn", "model to train", tuple(MODELS), architecture=True)
    hidden: tuple[int, ...] = _f((300, 100), "mlp: hidden layer widths, comma-separated",
                                 architecture=True)
    features: tuple[int, ...] = _f((32, 64, 128),
                                   "cnn: channels of each conv block; resnet: of each "
                                   "stage (comma-separated)", architecture=True)
    dense: int = _f(256, "cnn: width of the dense layer", architecture=True)
    dropout: float | None = _f(None, "dropout rate; unset: the model's own default")
    batch_norm: bool = _f(True, "cnn: batch normalisation after each convolution",
                          architecture=True)
    blocks: int = _f(2, "resnet: residual blocks per stage (--features gives the stages' "
                     "widths)", architecture=True)
    whiten: bool = _f(False, "cnn, resnet: start the first convolution from the whitening "
                             "of 3x3 patches of the training images (airbench's first "
                             "layer, here trained on): their principal directions scaled "
                             "to unit variance, each with its negation, largest variance "
                             "first, as many as the layer has filters")
    # How to train it.
    optimizer: str = _f("adam", "optimizer", OPTIMIZERS)
    learning_rate: float = _f(5e-3, "peak learning rate")
    schedule: str = _f("warmup_cosine", "learning-rate schedule", SCHEDULES)
    warmup_epochs: float = _f(0.3, "warmup_cosine: epochs of linear warm-up")
    decay_rate: float = _f(0.9, "exponential: factor per epoch")
    momentum: float = _f(0.9, "sgd: momentum (0 for plain SGD)")
    nesterov: bool = _f(False, "sgd: Nesterov momentum")
    weight_decay: float = _f(0.0, "weight decay on kernels (decoupled for adamw)")
    clip_grad_norm: float = _f(0.0, "clip gradients to this global norm; 0 turns it off")
    loss: str = _f("sparse", "sparse (integer labels) or categorical (one-hot targets)",
                   LOSSES)
    label_smoothing: float = _f(0.1, "label smoothing in [0, 1)")
    random_crop: int = _f(0, "augmentation: pad by N black pixels, then crop a random window "
                          "of the image's size (0: off)")
    random_flip: bool = _f(False, "augmentation: mirror left-right with probability 1/2")
    random_erasing: float = _f(0.0, "augmentation: black out a random rectangle with this "
                               "probability")
    mixup: float = _f(0.0, "augmentation: MixUp, each image blended with another of the "
                           "batch with weight ~ Beta(a, a), a this value (0.2 to 1 are usual; "
                           "0: off); the loss weighs both labels")
    cutmix: float = _f(0.0, "augmentation: CutMix, a rectangle of another image of the batch "
                            "pasted in, covering ~ Beta(a, a) of the area, a this value (1 is "
                            "usual; 0: off); the loss weighs both labels by their pixels")
    mix_prob: float = _f(1.0, "the share of training images --mixup or --cutmix mixes (with "
                              "both on, half of them each)")
    tta_flip: bool = _f(False, "test-time augmentation: the run's model is evaluated "
                                "(summary's validation and test, fmnist-evaluate, predict, "
                                "export) on the mean of the logits of each image and of its "
                                "mirror image; per-epoch validation sees each image once")
    tta_shift: int = _f(0, "test-time augmentation: the mean of the logits of each image "
                           "translated by -N to +N pixels along each axis, N this value "
                           "((2N+1)^2 views: 9 for 1, 25 for 2, that many times the time of "
                           "those evaluations, twice that with --tta_flip); a bare "
                           "--tta_shift is 1; for models trained with --random_crop=N or more",
                        bare=1)
    ema_decay: float = _f(0.998, "keep an exponential moving average of the weights (decay "
                          "per step, at most (1+t)/(10+t) at step t) and evaluate, "
                          "checkpoint and predict with it; 0 turns it off")
    epochs: int = _f(6, "training epochs")
    batch_size: int = _f(128, "images per training step (per micro-batch with "
                              "--accumulate_steps: an update sees batch_size x "
                              "accumulate_steps images)")
    accumulate_steps: int = _f(1, "gradient accumulation: average the gradients of N "
                                  "micro-batches of --batch_size images, then update once; "
                                  "schedules count updates")
    patience: int = _f(0, "stop after this many epochs without improvement of --monitor "
                          "and restore the best weights; 0 turns early stopping off")
    monitor: str = _f("val_accuracy", "validation metric for early stopping", MONITORS)
    seed: int = _f(0, "random seed: initialisation, data order and dropout")
    # Data.
    dataset: str = _f("fashion_mnist", "the data set: fashion_mnist, mnist or kmnist (their "
                                       "official IDX files); with --data_source=tfds, any tfds "
                                       "image-classification data set prepared on this "
                                       "machine (e.g. cifar10)")
    data_source: str = _f("idx", "idx: the official files, resident on the device; tfds: "
                                 "tensorflow-datasets, streamed from the host", DATA_SOURCES)
    data_dir: str = _f("", "directory with the four Fashion-MNIST .gz files (or the tfds "
                           "data dir); empty: $FMNIST_DATA_DIR, the cache, known copies, "
                           "else download", resumable=True)
    validation_size: int = _f(5000, "training images held out for validation (the first N)")
    eval_batch_size: int | None = _f(None, "images per evaluation step; unset: the backend's "
                                     "default "
                              "(BACKEND_DEFAULTS: " + ", ".join(
                                  f"{backend} {defaults['eval_batch_size']}"
                                  for backend, defaults in BACKEND_DEFAULTS.items()) + ")",
                              resumable=True)
    steps_per_dispatch: int | None = _f(None, "training steps run on the device per host call; "
                                        "unset: the divisor of the epoch's steps nearest to 100 (every "
                                 "dispatch the same length: one compilation)",
                                 resumable=True)
    # Devices.
    dtype: str = _f("float32", "computation dtype of our models' layers (Flax's dtype=): "
                               "bfloat16 convolutions and matmuls, with float32 parameters, "
                               "optimizer state and batch-norm statistics; a model of your "
                               "own sets its layers' dtype itself", DTYPES)
    distributed: bool = _f(False, "call jax.distributed.initialize() to train on several "
                                  "hosts (automatic when JAX_COORDINATOR_ADDRESS is set)",
                           resumable=True)
    # Output and checkpoints.
    workdir: str = _f("", "directory for checkpoints, config.json, metrics.jsonl and "
                          "summary.json; a workdir with checkpoints is resumed; empty: "
                          "runs/<model>-<time>", resumable=True)
    fresh: bool = _f(False, "start over in a workdir that has checkpoints (the old ones "
                            "are moved to <workdir>/previous-<time>/)", resumable=True)
    checkpoint_every_steps: int = _f(0, "also checkpoint every N optimizer steps (at the "
                                        "next dispatch boundary); 0: only every epoch",
                                     resumable=True)
    keep_checkpoints: int = _f(3, "checkpoints kept: the newest N, plus the best by "
                                  "--monitor", resumable=True)
    progress: bool = _f(True, "show a progress bar", resumable=True)
    tensorboard: bool = _f(False, "also write the per-epoch metrics as TensorBoard events "
                           "in WORKDIR/tensorboard (needs tensorboardX, not TensorFlow)",
                           resumable=True)
    compilation_cache: bool = _f(True, "fmnist-train: keep compiled programs in JAX's "
                                       "persistent cache ($XDG_CACHE_HOME/fmnist_jax/jax), "
                                       "so later runs start faster; off for a run of several "
                                       "processes on CPUs (fit() in Python leaves JAX's "
                                       "setting alone: see enable_compilation_cache)",
                                 resumable=True)
    test_every_epoch: bool = _f(False, "also evaluate the test split after every epoch "
                                       "(for time-to-accuracy benchmarks; choose models "
                                       "on validation, not on this)", resumable=True)
    plots: bool = _f(True, "write learning curves, confusion matrix, a grid of test "
                           "predictions and the most confused pairs as PNG into the workdir",
                     resumable=True)
    profile_steps: int = _f(0, "write a jax.profiler trace of N steady-state training steps "
                                "(from the second dispatch on) to WORKDIR/profile, for "
                                "TensorBoard's profile plugin or Perfetto; 0: off",
                            resumable=True)
    debug_nans: bool = _f(False, "JAX's NaN checking: stop at the first operation that "
                                 "makes a NaN, with its traceback (slow)", resumable=True)

    @classmethod
    def fields_marked(cls, mark: str) -> tuple[str, ...]:
        """The names of the fields whose metadata has ``mark`` (``resumable``,
        ``architecture``), in their order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(mark))

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def for_backend(self, backend: str) -> Config:
        """This config with every unset field of :data:`BACKEND_DEFAULTS` given the value
        for ``backend`` (``cpu``, ``gpu``, ``tpu``): resolved in this one place."""
        defaults = BACKEND_DEFAULTS.get(backend, BACKEND_DEFAULTS["gpu"])
        return self.replace(**{name: value for name, value in defaults.items()
                               if getattr(self, name) is None})

    def model_kwargs(self) -> dict:
        return dict(hidden=self.hidden, features=self.features, dense=self.dense,
                    dropout=self.dropout,
                    batch_norm=self.batch_norm, blocks=self.blocks,
                    dtype=None if self.dtype == "float32" else self.dtype)

    def to_dict(self) -> dict:
        """JSON-ready values (tuples as lists), as in config.json and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """The config of ``to_dict`` (or of a config.json, whose ``custom`` entry, naming
        the model, optimizer or loss given to ``fit`` in place of the config's, and ``data``
        entry, the data's :class:`~fmnist_jax.data.DataSpec`, are ignored)."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        # config.json's notes: what fit was given in place of the config's; the data's spec
        values = {k: v for k, v in values.items() if k not in ("custom", "data")}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise UserError(f"unknown config field(s): {', '.join(unknown)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        for name, unset in _OLD_SENTINELS.items():  # config.json of earlier versions
            if fixed.get(name) == unset:
                fixed[name] = None
        if isinstance(fixed.get("tta_shift"), bool):  # earlier versions: on (1 pixel) or off
            fixed["tta_shift"] = int(fixed["tta_shift"])
        return cls(**fixed)

    def validate(self) -> Config:
        """Checks every value that can be checked without the data; returns ``self``."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise UserError(f"--{f.name}={value} is not one of: {', '.join(choices)}")
        checks = [
            (self.learning_rate > 0, "--learning_rate must be positive"),
            (self.epochs >= 0, "--epochs must be 0 or more"),
            (self.batch_size > 0, "--batch_size must be positive"),
            (self.accumulate_steps > 0, "--accumulate_steps must be positive"),
            (self.profile_steps >= 0, "--profile_steps must be 0 or more"),
            (self.eval_batch_size is None or self.eval_batch_size > 0,
             "--eval_batch_size must be positive"),
            (self.steps_per_dispatch is None or self.steps_per_dispatch > 0,
             "--steps_per_dispatch must be positive"),
            (self.validation_size >= 0, "--validation_size must be 0 or more"),
            (self.patience >= 0, "--patience must be 0 or more"),
            (self.patience == 0 or self.validation_size > 0,
             "--patience needs a validation split (--validation_size > 0)"),
            (0 <= self.label_smoothing < 1, "--label_smoothing must be in [0, 1)"),
            (0 <= self.ema_decay < 1, "--ema_decay must be in [0, 1)"),
            (0 <= self.random_crop <= 14, "--random_crop must be 0 to 14 pixels"),
            (0 <= self.tta_shift <= 14, "--tta_shift must be 0 to 14 pixels"),
            (0 <= self.random_erasing <= 1, "--random_erasing must be in [0, 1]"),
            (self.mixup >= 0, "--mixup must be 0 or more"),
            (self.cutmix >= 0, "--cutmix must be 0 or more"),
            (0 <= self.mix_prob <= 1, "--mix_prob must be in [0, 1]"),
            (self.dropout is None or 0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight_decay must be 0 or more"),
            (self.clip_grad_norm >= 0, "--clip_grad_norm must be 0 or more"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (self.warmup_epochs >= 0, "--warmup_epochs must be 0 or more"),
            (0 < self.decay_rate <= 1, "--decay_rate must be in (0, 1]"),
            (len(self.hidden) > 0 and min(self.hidden) > 0, "--hidden needs positive widths"),
            (0 < len(self.features) <= 4 and min(self.features) > 0,
             "--features needs 1 to 4 positive channel counts"),
            (self.dense > 0, "--dense must be positive"),
            (self.blocks > 0, "--blocks must be positive"),
            (not self.whiten or self.model in ("cnn", "resnet"),
             "--model must be cnn or resnet for --whiten"),
            (self.checkpoint_every_steps >= 0, "--checkpoint_every_steps must be 0 or more"),
            (self.keep_checkpoints >= 1, "--keep_checkpoints must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message} (got {self._value_in(message)})")
        return self

    def _value_in(self, message: str) -> str:
        name = message.split()[0].removeprefix("--")
        return f"{name}={getattr(self, name)}"


# Named setups. Each states what it is expected to reach on the real data.
PRESETS: dict[str, dict] = {
    # The default: our CNN (dropout 0.1), Adam 0.005 with a warm-up cosine schedule, label
    # smoothing 0.1, 6 epochs, evaluated with weight averaging; chosen on validation for
    # time to 93% test (experiments/README.md, 2026-12-01). Expected: ~93.0% test.
    "cnn": {},
    # Our MLP setup: the seed architecture with Adam and a cosine schedule. ~89% test.
    "mlp": dict(model="mlp", learning_rate=1e-3, epochs=20, label_smoothing=0.0),
    # The seed MLP notebook: SGD lr 0.01 (no momentum), batch 32, 30 epochs, 5,000 held
    # out; it reported ~88.2% validation accuracy.
    "mlp_seed": dict(model="mlp", optimizer="sgd", momentum=0.0, learning_rate=0.01,
                     schedule="constant", batch_size=32, epochs=30, ema_decay=0.0,
                     label_smoothing=0.0),
    # The seed Keras CNN: Adadelta lr 1.0, batch 128, categorical loss, 12 epochs; it
    # reported 90.85% test accuracy at best. Expected here: ~92.9% test (experiments/README.md).
    "cnn_seed": dict(model="cnn_seed", optimizer="adadelta", learning_rate=1.0,
                     schedule="constant", loss="categorical", batch_size=128, epochs=12,
                     ema_decay=0.0, label_smoothing=0.0),
    # Experiment 4, our best CNN without augmentation, chosen on validation among the
    # default, 30 epochs with label smoothing and this one: the CNN at 1.5x width (876,586
    # parameters), label smoothing 0.1, 20 epochs. Expected: ~93.6% test
    # (experiments/README.md).
    "cnn_wide": dict(features=(48, 96, 192), dense=384, dropout=0.3, learning_rate=3e-3,
                     label_smoothing=0.1, epochs=20),
    # The recipe for 94% test on 2 CPU cores within 10 PyTorch epochs (experiments/README.md,
    # 2026-12-05), chosen on the 5,000 held-out images: our CNN (390,858 parameters), Muon on
    # its convolution kernels (lr 0.005), random crop of 1 px, label smoothing 0.1, 13
    # epochs, evaluated on the mean of 9 one-pixel translations of each image; then trained
    # on all 60,000 training images (no validation split). Expected: ~94.1% test, about 6
    # minutes on 2 CPU cores.
    "best_cpu": dict(optimizer="muon", learning_rate=5e-3, random_crop=1, label_smoothing=0.1,
                     epochs=13, tta_shift=1, validation_size=0),
    # The longer recipe (within 60 PyTorch epochs): cnn_wide with random crop (2 px), 45
    # epochs, shift test-time augmentation. Expected: ~94.5% test, short of the 95% target
    # (experiments/README.md).
    "best_cpu_long": dict(features=(48, 96, 192), dense=384, dropout=0.3, learning_rate=3e-3,
                          random_crop=2, label_smoothing=0.1, epochs=45, tta_shift=1),
    # The stronger preset (experiment 5): a wide pre-activation ResNet, 2 blocks per stage
    # at 64, 128, 256 channels (2.8 M parameters), random crop (2 px), flip and erasing,
    # SGD with Nesterov momentum, cosine decay, weight decay, label smoothing and weight
    # averaging, 60 epochs. Made for a GPU or TPU (see experiments/README.md for figures).
    "resnet": dict(model="resnet", features=(64, 128, 256), blocks=2, optimizer="sgd",
                   nesterov=True, learning_rate=0.1, schedule="warmup_cosine",
                   weight_decay=5e-4, label_smoothing=0.1, random_crop=2, random_flip=True,
                   random_erasing=0.5, ema_decay=0.999, epochs=60),
}


def preset(name: str, **overrides) -> Config:
    """A named preset, with any fields overridden."""
    if name not in PRESETS:
        raise UserError(f"--preset={name} is not one of: {', '.join(PRESETS)}")
    return Config(**{**PRESETS[name], **overrides})
