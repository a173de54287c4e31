"""The training loop every task shares: optimiser steps over the task's batches, epochs, validation,
checkpoints, the progress display, the stopping rules, and the figures of the run."""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from .. import __version__, _functional
from . import checkpoint as checkpoints
from .config import Config
from .errors import UsageError
from .model import to_numpy
from .optim import OPTIMIZERS
from .progress import Progress


class Task:
    """What a task supplies to the loop. Subclasses set ``name``, ``unit`` (what a batch counts: tokens,
    frames, examples) and ``metric`` (the validation figure's name), and implement the methods below."""

    name = ""
    unit = "tokens"

    @staticmethod
    def defaults(cfg: Config) -> Config:
        """``cfg`` with every option left None set to this task's default."""
        raise NotImplementedError

    steps_per_epoch: int

    def params(self) -> dict:
        """Every trainable array by name; the optimiser updates these arrays in place."""
        raise NotImplementedError

    def set_params(self, arrays: dict) -> None:
        raise NotImplementedError

    def train_batch(self, epoch: int, position: int, step: int) -> tuple[float, int, dict]:
        """(loss, units, gradients by parameter name) of batch ``position`` of epoch ``epoch``."""
        raise NotImplementedError

    def evaluate(self, split: str) -> float:
        """The loss on a split ('valid', 'test'), in evaluation mode."""
        raise NotImplementedError

    def describe(self, loss: float) -> str:
        return f"{loss:.4f}"

    def describe_split(self, split: str, loss: float) -> str:
        """The figures of an evaluation of ``split`` that returned ``loss``."""
        return self.describe(loss)

    def header(self) -> str:
        raise NotImplementedError

    @staticmethod
    def data_identity(cfg: Config) -> dict:
        """{"path", "sha256"} of ``cfg.data`` without reading it as the task does (a checkpoint's data is
        checked before a model is built on it)."""
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        raise NotImplementedError

    def state(self) -> tuple[dict, dict]:
        """(JSON-able record, arrays) of what the task needs besides parameters to resume exactly."""
        return {}, {}

    def load_state(self, record: dict, arrays: dict) -> None:
        pass

    def finish(self, out, results: dict, sample_length: int) -> None:
        """Task-specific figures at the end of a run (a sample, test accuracy)."""


class Trainer:
    """One run: the task, the optimiser and where the run is (step, epoch, batch within the epoch)."""

    def __init__(self, task: Task):
        self.task, self.cfg = task, task.cfg
        cfg = self.cfg
        self.optimizer = OPTIMIZERS[cfg.optimizer](cfg.lr)
        self.step = 0          # optimiser steps so far
        self.epoch = 0         # epochs completed
        self.position = 0      # batches of the current epoch done
        self.history = []      # (step, training loss)
        self.valid_history = []  # (step, validation loss)
        self.best = None       # with keep_best: (validation loss, step, copy of the parameters)

    def validated(self, loss: float) -> None:
        if self.valid_history and self.valid_history[-1][0] == self.step:
            return  # a resumed run that had already ended: validated there before
        self.valid_history.append((self.step, loss))
        if self.cfg.keep_best and (self.best is None or loss < self.best[0]):
            self.best = (loss, self.step, {k: v.copy() for k, v in self.task.params().items()})

    def train_step(self) -> tuple[float, int]:
        cfg, task = self.cfg, self.task
        loss, units, grads = task.train_batch(self.epoch, self.position, self.step)
        if cfg.clip > 0:
            _functional.clip_grad_norm(grads, cfg.clip)
        self.optimizer.step(task.params(), grads)
        self.step += 1
        self.position += 1
        if self.position >= task.steps_per_epoch:
            self.position = 0
            self.epoch += 1
            if cfg.optimizer == "sgd" and cfg.decay_after and self.epoch >= cfg.decay_after:
                self.optimizer.lr *= cfg.lr_decay
        self.history.append((self.step, loss))
        return loss, units

    def total_steps(self) -> int:
        total = self.cfg.epochs * self.task.steps_per_epoch
        return total if self.cfg.max_steps is None else min(self.cfg.max_steps, total)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        scalars, optimizer_arrays = self.optimizer.state()
        record, task_arrays = self.task.state()
        arrays = {f"param.{k}": to_numpy(v) for k, v in self.task.params().items()}
        arrays.update({f"optim.{k}": to_numpy(v) for k, v in optimizer_arrays.items()})
        arrays.update({f"task.{k}": to_numpy(v) for k, v in task_arrays.items()})
        if self.best is not None:
            arrays.update({f"best.{k}": to_numpy(v) for k, v in self.best[2].items()})
        meta = {"conveyor": __version__, "task": self.task.name, "config": self.cfg.to_dict(),
                "data": self.task.identity, "task_state": record,
                "trainer": {"step": self.step, "epoch": self.epoch, "position": self.position,
                            "optimizer": scalars, "history": self.history,
                            "valid_history": self.valid_history,
                            "best": None if self.best is None else self.best[:2]}}
        checkpoints.save(path, meta, arrays)

    def load(self, meta: dict, arrays: dict) -> None:
        xp = self.task.xp
        part = {prefix: {k[len(prefix):]: xp.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}
                for prefix in ("param.", "optim.", "task.", "best.")}
        expected = {k: tuple(v.shape) for k, v in self.task.params().items()}
        found = {k: tuple(v.shape) for k, v in part["param."].items()}
        if found != expected:
            raise UsageError(f"--resume: the checkpoint's parameters {sorted(found.items())[:3]}... do not "
                             f"fit the model {sorted(expected.items())[:3]}...")
        self.task.set_params(part["param."])
        state = meta["trainer"]
        self.optimizer.load(state["optimizer"], part["optim."])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.history = [tuple(entry) for entry in state["history"]]
        self.valid_history = [tuple(entry) for entry in state["valid_history"]]
        if state.get("best") is not None:
            self.best = (*state["best"], part["best."])
        self.task.load_state(meta["task_state"], part["task."])


def run(task: Task, *, checkpoint=None, resume=None, sample_length=0, plot=None, print_every=20,
        out=None) -> dict:
    """Trains as ``task.cfg`` says and returns the figures of the run (also printed, to ``out`` or stdout).
    ``resume``: (path, meta, arrays) of a checkpoint already read."""
    out = sys.stdout if out is None else out
    cfg = task.cfg
    trainer = Trainer(task)
    if resume is not None:
        path, meta, arrays = resume
        trainer.load(meta, arrays)
        print(f"resumed from {path} at step {trainer.step} (epoch {trainer.epoch + 1}, batch "
              f"{trainer.position} of {task.steps_per_epoch})", file=out)
    total = trainer.total_steps()
    if resume is not None and trainer.step >= total:
        print(f"the run had reached its end (step {trainer.step} of {total}); give --max-steps, --epochs or "
              "--full to train further", file=out)
    n_params = sum(int(np.prod(p.shape)) for p in task.params().values())
    stop = (f"{cfg.epochs} epoch(s) of {task.steps_per_epoch} steps" if cfg.max_steps is None
            or cfg.max_steps >= cfg.epochs * task.steps_per_epoch
            else f"{total} steps ({total / task.steps_per_epoch:.2f} of {cfg.epochs} epoch(s) of "
                 f"{task.steps_per_epoch} steps)")
    print(f"conveyor train: {task.header()}; {n_params:,} parameters; {cfg.optimizer} lr {cfg.lr}, "
          f"batch {cfg.batch}, {stop}{f' or {cfg.minutes} minutes' if cfg.minutes else ''}, device "
          f"{cfg.device}", file=out, flush=True)
    eval_every = cfg.eval_every
    progress = Progress(out, trainer.step, total, print_every, task.unit)
    start, units, last, training_seconds = time.perf_counter(), 0, None, 0.0
    deadline = None if cfg.minutes is None else start + 60 * cfg.minutes
    try:
        while trainer.step < total and (deadline is None or time.perf_counter() < deadline):
            window_start = time.perf_counter()
            loss, n = trainer.train_step()
            training_seconds += time.perf_counter() - window_start
            units += n
            last = loss
            progress.update(trainer.step, loss, task.describe(loss), units / max(training_seconds, 1e-9))
            if eval_every and trainer.step % eval_every == 0 and trainer.step < total:
                valid = task.evaluate("valid")
                trainer.validated(valid)
                progress.write(f"step {trainer.step}: validation {task.describe_split('valid', valid)}")
                if checkpoint:
                    trainer.save(checkpoint)
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    valid = task.evaluate("valid")
    trainer.validated(valid)
    rate = units / max(training_seconds, 1e-9)
    results = {"steps": trainer.step, "train_loss": last, "valid_loss": valid, "seconds": elapsed,
               "units_per_second": rate}
    print(f"after {trainer.step} steps ({elapsed:.0f} s; training {rate:,.0f} {task.unit}/s): "
          f"validation {task.describe_split('valid', valid)}", file=out)
    if task.has_split("test"):
        results["test_loss"] = task.evaluate("test")
        print(f"test {task.describe_split('test', results['test_loss'])}", file=out)
    if trainer.best is not None and trainer.best[1] != trainer.step:
        # Early stopping: the figures of the parameters that did best on the validation split.
        best_valid, best_step, best_params = trainer.best
        now = task.params()
        task.set_params(best_params)
        results.update(best_step=best_step, best_valid_loss=best_valid)
        line = f"best validation {task.describe(best_valid)} at step {best_step}"
        if task.has_split("test"):
            results["best_test_loss"] = task.evaluate("test")
            line += f"; test there {task.describe_split('test', results['best_test_loss'])}"
        print(line, file=out)
        task.set_params(now)
    if checkpoint:
        trainer.save(checkpoint)
        print(f"checkpoint: {checkpoint}", file=out)
    task.finish(out, results, sample_length)
    if plot:
        results["plot"] = draw_curves(plot, trainer, task.metric, out)
    results["trainer"] = trainer
    return results


def draw_curves(path, trainer, metric, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); training was not affected",
              file=out)
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if trainer.history:
        steps, losses = zip(*trainer.history)
        ax.plot(steps, losses, label="training (per batch)", alpha=0.6)
    if trainer.valid_history:
        steps, losses = zip(*trainer.valid_history)
        ax.plot(steps, losses, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}", file=out)
    return path


def sha256_of(paths) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700))
