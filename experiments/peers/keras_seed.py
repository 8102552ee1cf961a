"""The seed MLP and seed CNN in Keras 3 on TensorFlow (CPU), for experiments/benchmark.py.

    python keras_seed.py mlp|cnn EPOCHS BATCH_SIZE
"""

import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import common  # noqa: E402

keras.utils.set_random_seed(0)
model_name, epochs, batch_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x, y, xt, yt = common.load()
L = keras.layers
if model_name == "mlp":
    model = keras.Sequential([keras.Input((28, 28)), L.Flatten(), L.Dense(300, "relu"),
                              L.Dropout(0.2), L.Dense(100, "relu"), L.Dropout(0.2),
                              L.Dense(10)])
    optimizer = keras.optimizers.SGD(learning_rate=0.01)
else:
    x, xt = x[..., None], xt[..., None]
    model = keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(32, 3, activation="relu"),
                              L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(2),
                              L.Dropout(0.25), L.Flatten(), L.Dense(128, "relu"),
                              L.Dropout(0.5), L.Dense(10)])
    optimizer = keras.optimizers.Adadelta(learning_rate=1.0, rho=0.95, epsilon=1e-7)
model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])


class Timer(keras.callbacks.Callback):
    def __init__(self):
        self.times, self.accuracies, self.first_step = [], [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self.first_step is None:
            self.first_step = time.time()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)
        self.accuracies.append(float(self.model.evaluate(xt, yt, batch_size=1000,
                                                         verbose=0)[1]))


timer = Timer()
model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
          callbacks=[timer])
common.report(timer.times, timer.accuracies, timer.first_step)
