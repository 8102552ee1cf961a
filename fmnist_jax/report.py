"""What a run tells its user, as a loop hook: the console (start-up line, a progress bar
during each epoch, one line per epoch, the test result), the workdir's files
(``config.json``, ``metrics.jsonl``, ``summary.json``, TensorBoard events) and the plots.

Only process 0 prints and writes. Plots are drawn from the test evaluation's logits:
nothing is computed again for them.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from fmnist_jax import files, parallel, plots
from fmnist_jax.config import Config
from fmnist_jax.data import DataSpec, Split
from fmnist_jax.metrics import JsonlWriter, TensorBoardWriter
from fmnist_jax.progress import progress_bar


def log(*args) -> None:
    """Prints on process 0 only."""
    if parallel.is_main_process():
        print(*args, flush=True)


def process_age() -> float:
    """Seconds since this process started (what a user waits for).

    On Linux, from the kernel's record of the start (``/proc/self/stat``, clock ticks since
    boot) against ``CLOCK_BOOTTIME``: exact to a tick (10 ms). ``psutil``'s ``create_time``
    adds the start to the boot time of ``/proc/stat``, which is truncated to a whole
    second, so its age is too long by up to a second, the same for every process of a boot
    (enough to make a run seem to end before its test; experiments/README.md).
    Elsewhere ``psutil``'s; without it, seconds since this module was imported.
    """
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        pass
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing: count from import
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


class Reporter:
    """The console and the workdir's files of one run (``out`` None: console only)."""

    def __init__(self, out: Path | None, config: Config):
        self.config = config
        self.out = out if parallel.is_main_process() else None
        self.writers: list = []
        self.bar = None
        self.timings = {"training_starts_s": None}
        self.throughput: list[float] = []  # images/s of each epoch of this process

    def start(self, line: str, steps_per_epoch: int) -> None:
        """Prints the start-up line."""
        log(line + (f"; writing to {self.out}" if self.out else ""))
        self.steps_per_epoch = steps_per_epoch

    def open(self, progress, custom: dict, spec: DataSpec) -> None:
        """Writes config.json and the history so far; opens the metric files; starts the
        first epoch's progress bar."""
        self.timings["training_starts_s"] = process_age()
        self._begin_epoch(progress)
        history = progress.history
        if self.out is None:
            return
        files.write_json(self.out / "config.json",
                         {**self.config.to_dict(), **({"custom": custom} if custom else {}),
                          "data": spec.to_dict()})
        files.write_jsonl(self.out / "metrics.jsonl", history)
        self.writers.append(JsonlWriter(self.out / "metrics.jsonl", append=True))
        if self.config.tensorboard:
            self.writers.append(TensorBoardWriter(self.out / "tensorboard"))

    def after_dispatch(self, event) -> None:
        if "first_dispatch_done_s" not in self.timings:
            self.timings["first_dispatch_done_s"] = process_age()
        progress = event.progress
        if self.bar is None:
            self._begin_epoch(progress)
        self.bar.update(progress.step_in_epoch - self.bar.n)
        scores = {k: float(v) for k, v in progress.metrics.compute().items()}
        self.bar.set_postfix(loss=f"{scores['loss']:.4f}", acc=f"{scores['accuracy']:.4f}")

    def after_epoch(self, event) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        record = event.record
        self.throughput.append(record["images_per_s"])
        for writer in self.writers:
            writer.write(record)
        log(_epoch_line(record, self.config.epochs))
        if not event.progress.finished:
            self._begin_epoch(event.progress)  # its clock starts now, with its first step
        if event.progress.stopped_early:
            log(f"early stopping: no {self.config.monitor} improvement for "
                f"{self.config.patience} epochs; the run's model is epoch "
                f"{event.progress.best_epoch}'s")
        elif event.progress.stopped_by:
            log(f"training stopped by a callback ({event.progress.stopped_by}) after epoch "
                f"{record['epoch']}")

    def finish(self, summary: dict, test: Split, logits: np.ndarray,
               history: list[dict], class_names: tuple[str, ...]) -> None:
        """Prints the test result; writes summary.json and the plots."""
        log(f"test: loss {summary['test_loss']:.4f}, accuracy "
            f"{100 * summary['test_accuracy']:.2f}% ({summary['test_count']} images); "
            f"{summary['wall_time_s']:.1f} s in all")
        if self.out is None:
            return
        files.write_json(self.out / "summary.json", summary)
        if self.config.plots and history:
            probabilities = np.exp(logits - logits.max(-1, keepdims=True))
            probabilities /= probabilities.sum(-1, keepdims=True)
            names = plots.write_run_plots(self.out, history, test.images, test.labels,
                                          probabilities, class_names, summary["model"],
                                          train_loss_label(self.config, summary["loss"]))
            log(f"plots: {', '.join(str(self.out / n) for n in names)}")

    def _begin_epoch(self, progress) -> None:
        """The progress bar of the epoch about to train: its rate counts the steps done
        since now, so the first update is not a dispatch that took no time."""
        if self.bar is None and progress.epoch <= self.config.epochs:
            self.bar = _bar(self.config, progress.epoch, self.steps_per_epoch,
                            progress.step_in_epoch)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for writer in self.writers:
            writer.close()
        self.writers = []

    def abandon(self) -> None:
        """Closes what is open, after a run that stopped early (a signal, an error)."""
        self.close()


def train_loss_label(config: Config, loss: str) -> str:
    """What the training loss of ``metrics.jsonl`` is, in words: the objective trained on,
    which is not the validation's plain cross-entropy with label smoothing or a custom
    loss."""
    if loss == "custom":
        return "train objective (custom loss)"
    if config.label_smoothing:
        return f"train objective (label smoothing {config.label_smoothing:g})"
    return "train (cross-entropy)"


def _bar(config: Config, epoch: int, steps_per_epoch: int, done: int = 0):
    return progress_bar(total=steps_per_epoch, initial=done,
                        desc=f"epoch {epoch}/{config.epochs}", unit="step", leave=False,
                        disable=not (config.progress and parallel.is_main_process()),
                        file=sys.stderr)


def _epoch_line(r: dict, epochs: int) -> str:
    val = (f"  val loss {r['val_loss']:.4f} acc {100 * r['val_accuracy']:.2f}%"
           if "val_loss" in r else "")
    lr = f"  lr {r['learning_rate']:.2e}" if r.get("learning_rate") is not None else ""
    return (f"epoch {r['epoch']:>3}/{epochs}  train loss {r['train_loss']:.4f} "
            f"acc {100 * r['train_accuracy']:.2f}%{val}{lr}  "
            f"{r['images_per_s']:,.0f} img/s  {r['epoch_time_s']:.1f} s")
