"""``conveyor train``: character- and word-level language models trained with truncated BPTT.

The model is embedding -> LSTM/GRU stack (Conveyor) -> linear -> softmax cross-entropy, with optional
weight tying between the embedding and the output layer (Press & Wolf 2017; it needs embedding size =
hidden size), dropout on the embeddings, between layers and before the output (Zaremba, Sutskever & Vinyals
2014; variational masks with --variational, Gal & Ghahramani 2016), gradient-norm clipping, and SGD (with
Zaremba's learning-rate decay) or Adam. The corpus is cut into B parallel streams that TBPTT(k1, k2) walks
window by window, carrying the state across windows and resetting it at each epoch.

The non-recurrent parts are a few lines of array code over ``xp``: NumPy on the CPU, CuPy when the recurrent
layers run on the GPU (--device cuda), so that activations never leave the device. Every random draw comes
from --seed (initialisation) and counter-based dropout masks keyed by (seed, step), so a run is deterministic
and a checkpoint resumes it exactly.
"""

from __future__ import annotations

import gzip
import math
import os
import sys
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np

from . import _functional, layers
from ._stack import mask_stream
from .tbptt import TBPTT

# Dropout mask streams of the non-recurrent parts (the stack's own use layer << 16 | ...).
_EMBEDDING_STREAM = mask_stream(0xFFFF, 0, 0)
_OUTPUT_STREAM = mask_stream(0xFFFF, 0, 1)


# ---------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Corpus:
    """A tokenised corpus: the vocabulary and the train, valid and test splits as token ids."""

    level: str
    vocab: list
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray | None
    source: str

    @property
    def index(self) -> dict:
        return {token: i for i, token in enumerate(self.vocab)}


def _read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def _tokens(text: str, level: str) -> list:
    if level == "char":
        return list(text)
    return text.replace("\n", " <eos> ").split()  # as Zaremba's PTB loader


def _find(directory: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    return None


def load_corpus(data: str | None, level: str) -> Corpus:
    """``data``: None (the bundled Tiny Shakespeare), a directory holding PTB's ptb.{train,valid,test}.txt
    (optionally .gz), or one text file, split 90/5/5 in order."""
    if data is None:
        with resources.files("conveyor").joinpath("data/tinyshakespeare.txt.gz").open("rb") as f:
            text = gzip.decompress(f.read()).decode("utf-8")
        splits = _split(_tokens(text, level))
        source = "Tiny Shakespeare (bundled)"
    elif os.path.isdir(data):
        paths = [_find(data, f"ptb.{split}.txt") for split in ("train", "valid", "test")]
        if paths[0] is None or paths[1] is None:
            raise FileNotFoundError(f"--data: {data} has no ptb.train.txt and ptb.valid.txt (or .gz)")
        splits = [None if p is None else _tokens(_read_text(p), level) for p in paths]
        source = data
    elif os.path.isfile(data):
        splits = _split(_tokens(_read_text(data), level))
        source = data
    else:
        raise FileNotFoundError(f"--data: no such file or directory: {data}")
    vocab = sorted({token for split in splits if split is not None for token in split})
    index = {token: i for i, token in enumerate(vocab)}

    def ids(split):
        return None if split is None else np.fromiter((index[t] for t in split), np.int64, len(split))

    train, valid, test = (ids(s) for s in splits)
    if len(train) < 2 or len(valid) < 2:
        raise ValueError("--data: too little text to train and validate on")
    return Corpus(level, vocab, train, valid, test, source)


def _split(tokens: list) -> list:
    n = len(tokens)
    return [tokens[:int(0.9 * n)], tokens[int(0.9 * n):int(0.95 * n)], tokens[int(0.95 * n):]]


def streams(ids: np.ndarray, batch: int) -> np.ndarray:
    """[N, B]: the ids cut into B parallel streams read top to bottom (the tail that does not fill a row
    is dropped)."""
    n = len(ids) // batch
    return np.ascontiguousarray(ids[:n * batch].reshape(batch, n).T)


# ---------------------------------------------------------------------------------------------------------
# Model and optimisers


@dataclass
class Config:
    cell: str = "lstm"
    level: str = "char"
    embedding: int = 64
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0
    variational: bool = False
    tie: bool = False
    batch: int = 32
    k1: int = 64
    k2: int | None = None
    optimizer: str = "adam"
    lr: float = 2e-3
    lr_decay: float = 1.0
    decay_after: int = 0
    clip: float = 5.0
    epochs: int = 1
    max_steps: int | None = None
    minutes: float | None = None
    eval_every: int = 200
    eval_batch: int = 16
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"


def _xp(device: str):
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError as error:
        raise SystemExit("--device cuda needs CuPy (pip install cupy-cuda12x) and a GPU") from error
    return cupy


class LanguageModel:
    """Embedding E [V, D] -> Conveyor stack -> output layer W [V, H], b [V]; W is E when tied."""

    def __init__(self, vocab_size: int, cfg: Config):
        if cfg.tie and cfg.embedding != cfg.hidden:
            raise SystemExit(f"--tie needs --embedding = --hidden, got {cfg.embedding} and {cfg.hidden}")
        self.cfg = cfg
        self.xp = _xp(cfg.device)
        dtype = np.dtype(cfg.dtype)
        cls = {"lstm": layers.LSTM, "gru": layers.GRU}[cfg.cell]
        self.rnn = cls(cfg.embedding, cfg.hidden, num_layers=cfg.layers, dropout=cfg.dropout,
                       variational=cfg.variational, dtype=dtype, seed=cfg.seed)
        rng = np.random.default_rng([cfg.seed, 1])
        params = {"embedding": rng.uniform(-0.1, 0.1, (vocab_size, cfg.embedding)).astype(dtype)}
        if not cfg.tie:
            bound = 1.0 / math.sqrt(cfg.hidden)
            params["output_weight"] = rng.uniform(-bound, bound, (vocab_size, cfg.hidden)).astype(dtype)
        params["output_bias"] = np.zeros(vocab_size, dtype)
        self.params = {k: self.xp.asarray(v) for k, v in params.items()}
        if cfg.device == "cuda":
            self.rnn.to("cuda")

    def all_params(self) -> dict:
        return {**self.params, **{f"rnn.{k}": v for k, v in self.rnn.params.items()}}

    def output_weight(self):
        return self.params["embedding"] if self.cfg.tie else self.params["output_weight"]

    def _mask(self, like, shape, stream, step):
        if not (self.rnn.training and self.cfg.dropout > 0):
            return None
        seed = (self.cfg.seed * 1_000_003 + step) % 2**64
        return _functional.dropout_mask(like, shape, self.cfg.dropout, variational=self.cfg.variational,
                                        seed=seed, mask_stream=stream)

    def embed(self, tokens, step):
        emb = self.params["embedding"][tokens]
        mask = self._mask(emb, emb.shape, _EMBEDDING_STREAM, step)
        return (emb if mask is None else emb * mask), mask

    def loss_and_output_grads(self, h, targets, step):
        """Mean cross-entropy of the window and, in training, the gradients of the output layer and of h."""
        xp = self.xp
        mask = self._mask(h, h.shape, _OUTPUT_STREAM, step)
        hd = h if mask is None else h * mask
        T, B, H = hd.shape
        flat = hd.reshape(T * B, H)
        logits = flat @ self.output_weight().T + self.params["output_bias"]
        logits = logits - logits.max(axis=1, keepdims=True)
        log_norm = xp.log(xp.exp(logits).sum(axis=1))
        rows = xp.arange(T * B)
        target = targets.reshape(T * B)
        loss = float((log_norm - logits[rows, target]).mean())
        if not self.rnn.training:
            return loss, None, None
        probs = xp.exp(logits - log_norm[:, None])
        probs[rows, target] -= 1
        dlogits = probs / (T * B)
        grads = {"output_bias": dlogits.sum(axis=0), "_output_weight": dlogits.T @ flat}
        dh = (dlogits @ self.output_weight()).reshape(T, B, H)
        if mask is not None:
            dh = dh * mask
        return loss, grads, dh


class Adam:
    def __init__(self, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps, self.t = lr, beta1, beta2, eps, 0
        self.m, self.v = {}, {}

    def step(self, params, grads):
        self.t += 1
        correction1, correction2 = 1 - self.beta1**self.t, 1 - self.beta2**self.t
        for name, g in grads.items():
            if name not in self.m:
                self.m[name], self.v[name] = g * 0, g * 0
            self.m[name] = self.beta1 * self.m[name] + (1 - self.beta1) * g
            self.v[name] = self.beta2 * self.v[name] + (1 - self.beta2) * g * g
            update = (self.m[name] / correction1) / ((self.v[name] / correction2) ** 0.5 + self.eps)
            params[name] -= (self.lr * update).astype(params[name].dtype)  # in place

    def state(self):
        return {"t": self.t, "m": self.m, "v": self.v, "lr": self.lr}

    def load(self, state):
        self.t, self.m, self.v, self.lr = state["t"], state["m"], state["v"], state["lr"]


class SGD:
    def __init__(self, lr):
        self.lr = lr

    def step(self, params, grads):
        for name, g in grads.items():
            params[name] -= (self.lr * g).astype(params[name].dtype)

    def state(self):
        return {"lr": self.lr}

    def load(self, state):
        self.lr = state["lr"]


# ---------------------------------------------------------------------------------------------------------
# Training


class Trainer:
    """One training run: the model, the optimiser, the TBPTT driver and where the run is in the data."""

    def __init__(self, corpus: Corpus, cfg: Config, out=None):
        self.corpus, self.cfg, self.out = corpus, cfg, out
        self.model = LanguageModel(len(corpus.vocab), cfg)
        self.xp = self.model.xp
        self.optimizer = Adam(cfg.lr) if cfg.optimizer == "adam" else SGD(cfg.lr)
        self.train_streams = self.xp.asarray(streams(corpus.train, cfg.batch))
        self.windows_per_epoch = math.ceil((self.train_streams.shape[0] - 1) / cfg.k1)
        self.tbptt = TBPTT(self.model.rnn, cfg.k1, cfg.k2)
        self.step = 0          # optimiser steps so far
        self.epoch = 0         # epochs completed
        self.window = 0        # windows of the current epoch done
        self.history = []      # (step, train loss), (step, valid loss) records
        self.valid_history = []
        self._span = []        # (tokens, embedding mask, step) of the windows TBPTT can still reach back over

    # -- one optimiser step ---------------------------------------------------------------------------------
    def window_gradients(self, tokens, targets):
        """The loss of one window and the gradients of every parameter (TBPTT over the last k2 steps):
        (loss, {name: gradient}) with the names of ``model.all_params()``."""
        cfg, xp, model = self.cfg, self.xp, self.model
        model.rnn.train()
        emb, emb_mask = model.embed(tokens, self.step)
        h = self.tbptt.forward(emb)
        loss, grads, dh = model.loss_and_output_grads(h, targets, self.step)
        d_emb = self.tbptt.backward(dh)
        self._span.append((tokens, emb_mask, self.step))
        reach = cfg.k1 if cfg.k2 is None else cfg.k2
        while sum(chunk[0].shape[0] for chunk in self._span[1:]) >= reach:
            self._span.pop(0)
        span = d_emb.shape[0]  # the steps TBPTT went back over, the newest last
        span_tokens = xp.concatenate([chunk[0] for chunk in self._span])[-span:]
        if emb_mask is not None:
            d_emb = d_emb * xp.concatenate([chunk[1] for chunk in self._span])[-span:]
        d_embedding = xp.zeros_like(model.params["embedding"])
        _scatter_add(xp, d_embedding, span_tokens.reshape(-1), d_emb.reshape(-1, d_emb.shape[-1]))
        output_weight_grad = grads.pop("_output_weight")
        if cfg.tie:
            d_embedding += output_weight_grad
        else:
            grads["output_weight"] = output_weight_grad
        grads["embedding"] = d_embedding
        return loss, {**grads, **{f"rnn.{k}": v for k, v in model.rnn.grads.items()}}

    def train_window(self):
        """One optimiser step on the next window of the training streams: (loss, tokens, gradient norm)."""
        cfg = self.cfg
        if self.window == 0:
            self.tbptt.reset()
            self._span = []
        start = self.window * cfg.k1
        n = min(cfg.k1, self.train_streams.shape[0] - 1 - start)
        loss, grads = self.window_gradients(self.train_streams[start:start + n],
                                            self.train_streams[start + 1:start + n + 1])
        norm = _functional.clip_grad_norm(grads, cfg.clip) if cfg.clip > 0 else float("nan")
        self.optimizer.step(self.model.all_params(), grads)  # the arrays are updated in place
        self.step += 1
        self.window += 1
        if self.window >= self.windows_per_epoch:
            self.window = 0
            self.epoch += 1
            if cfg.optimizer == "sgd" and cfg.decay_after and self.epoch >= cfg.decay_after:
                self.optimizer.lr *= cfg.lr_decay
        return loss, n * cfg.batch, norm

    def evaluate(self, ids: np.ndarray) -> float:
        """Mean cross-entropy per token over a whole split, in evaluation mode (no dropout)."""
        cfg, xp, model = self.cfg, self.xp, self.model
        model.rnn.eval()
        data = xp.asarray(streams(ids, max(1, min(cfg.eval_batch, len(ids) // 2))))
        tb = TBPTT(model.rnn, cfg.k1)
        total, count = 0.0, 0
        for start in range(0, data.shape[0] - 1, cfg.k1):
            n = min(cfg.k1, data.shape[0] - 1 - start)
            emb, _ = model.embed(data[start:start + n], 0)
            loss, _, _ = model.loss_and_output_grads(tb.forward(emb), data[start + 1:start + n + 1], 0)
            total += loss * n
            count += n
        model.rnn.train()
        return total / count

    def sample(self, length: int, temperature: float = 0.8, prime: str | None = None) -> str:
        """Text generated one token at a time from the model (evaluation mode), seeded by --seed."""
        xp, model, corpus = self.xp, self.model, self.corpus
        model.rnn.eval()
        rng = np.random.default_rng([self.cfg.seed, 2])
        index = corpus.index
        if prime is None:
            prime = "\n" if corpus.level == "char" and "\n" in index else corpus.vocab[0]
        tokens = [index[t] for t in (_tokens(prime, corpus.level) or [corpus.vocab[0]]) if t in index] or [0]
        tb = TBPTT(model.rnn, max(1, len(tokens)))
        h = tb.forward(model.embed(xp.asarray(np.array(tokens)[:, None]), 0)[0])
        out = []
        for _ in range(length):
            logits = h[-1, 0] @ model.output_weight().T + model.params["output_bias"]
            logits = _to_numpy(logits).astype(np.float64) / temperature
            p = np.exp(logits - logits.max())
            token = int(rng.choice(len(p), p=p / p.sum()))
            out.append(corpus.vocab[token])
            h = tb.forward(model.embed(xp.asarray(np.array([[token]])), 0)[0])
        model.rnn.train()
        joiner = "" if corpus.level == "char" else " "
        text = joiner.join(out)
        return text.replace(" <eos> ", "\n").replace("<eos>", "\n") if corpus.level == "word" else text

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        arrays = {f"param.{k}": _to_numpy(v) for k, v in self.model.all_params().items()}
        opt = self.optimizer.state()
        for kind in ("m", "v"):
            for k, v in opt.get(kind, {}).items():
                arrays[f"adam.{kind}.{k}"] = _to_numpy(v)
        h, c = self.tbptt.state
        if h is not None:
            arrays["state.h"] = _to_numpy(h)
        if c is not None:
            arrays["state.c"] = _to_numpy(c)
        meta = dict(step=self.step, epoch=self.epoch, window=self.window, lr=opt["lr"], t=opt.get("t", 0),
                    rnn_windows=self.model.rnn._windows, history=self.history,
                    valid_history=self.valid_history,
                    config=self.cfg.__dict__, vocab=self.corpus.vocab)
        if self._span:
            # TBPTT(k1, k2 > k1) reaches back over earlier windows: keep their saved values and tokens.
            history, info = self.tbptt.export_history()
            arrays.update({f"history.{k}": _to_numpy(v) for k, v in history.items()})
            arrays["span.tokens"] = _to_numpy(self.xp.concatenate([chunk[0] for chunk in self._span]))
            meta["span"] = {"history": info, "steps": [chunk[2] for chunk in self._span],
                            "lengths": [int(chunk[0].shape[0]) for chunk in self._span]}
        arrays["meta"] = np.frombuffer(repr(meta).encode(), np.uint8)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        import ast

        with np.load(path) as f:
            meta = ast.literal_eval(bytes(f["meta"]).decode())
            if meta["vocab"] != self.corpus.vocab:
                raise SystemExit(f"--resume: {path} was trained on another vocabulary")
            xp = self.xp
            for name in list(self.model.params):
                self.model.params[name] = xp.asarray(f[f"param.{name}"])
            self.model.rnn.params = {k: xp.asarray(f[f"param.rnn.{k}"]) for k in self.model.rnn.params}
            if isinstance(self.optimizer, Adam):
                m = {k[len("adam.m."):]: xp.asarray(f[k]) for k in f.files if k.startswith("adam.m.")}
                v = {k[len("adam.v."):]: xp.asarray(f[k]) for k in f.files if k.startswith("adam.v.")}
                self.optimizer.load({"t": meta["t"], "m": m, "v": v, "lr": meta["lr"]})
            else:
                self.optimizer.load({"lr": meta["lr"]})
            state = (xp.asarray(f["state.h"]) if "state.h" in f.files else None,
                     xp.asarray(f["state.c"]) if "state.c" in f.files else None)
            span = None
            if "span" in meta:
                history = {k[len("history."):]: xp.asarray(f[k]) for k in f.files if k.startswith("history.")}
                span = (xp.asarray(f["span.tokens"]), history)
        self.step, self.epoch, self.window = meta["step"], meta["epoch"], meta["window"]
        self.model.rnn._windows = meta["rnn_windows"]
        self.history, self.valid_history = meta["history"], meta["valid_history"]
        self.tbptt.reset()
        self._span = []
        if span is not None:
            tokens, history = span
            self.tbptt.import_history(history, meta["span"]["history"])
            self.model.rnn.train()
            offset = 0
            for step, length in zip(meta["span"]["steps"], meta["span"]["lengths"]):
                chunk = tokens[offset:offset + length]
                offset += length
                self._span.append((chunk, self.model.embed(chunk, step)[1], step))
        self.tbptt.state = state


def _scatter_add(xp, target, rows, values):
    if xp is np:
        np.add.at(target, rows, values)
    else:
        import cupyx

        cupyx.scatter_add(target, rows, values)


def _to_numpy(a):
    return a if isinstance(a, np.ndarray) else a.get()


# ---------------------------------------------------------------------------------------------------------
# The command


def _describe(loss: float, level: str) -> str:
    if level == "char":
        return f"{loss:.4f} nats/char ({loss / math.log(2):.3f} bits/char)"
    return f"{loss:.4f} (perplexity {math.exp(min(loss, 700)):.2f})"


class _Progress:
    """One line that redraws itself on a terminal; a line every `every` steps elsewhere (logs, CI)."""

    def __init__(self, out, total, every):
        self.out, self.total, self.every = out, total, every
        self.tty = hasattr(out, "isatty") and out.isatty()

    def update(self, step, text):
        if self.tty:
            width = 24
            done = int(width * min(step, self.total) / self.total) if self.total else 0
            print(f"\r[{'=' * done}{' ' * (width - done)}] {text}", end="", file=self.out, flush=True)
        elif step == 1 or step % self.every == 0:
            print(text, file=self.out, flush=True)

    def close(self):
        if self.tty:
            print(file=self.out)


def run(cfg: Config, corpus: Corpus, *, checkpoint=None, resume=None, sample_length=300, plot=None,
        print_every=20, out=None) -> dict:
    """Trains as `cfg` says and returns the figures of the run (also printed, to `out` or stdout)."""
    out = sys.stdout if out is None else out
    trainer = Trainer(corpus, cfg, out)
    if resume is not None:
        trainer.load(resume)
        print(f"resumed from {resume} at step {trainer.step} (epoch {trainer.epoch}, "
              f"window {trainer.window})", file=out)
    per_epoch = trainer.windows_per_epoch
    total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
    n_params = sum(int(np.prod(p.shape)) for p in trainer.model.all_params().values())
    print(f"conveyor train: {cfg.layers}-layer {cfg.cell.upper()} of {cfg.hidden} units on {corpus.source} "
          f"({cfg.level} level, vocabulary {len(corpus.vocab)}, {len(corpus.train):,} training tokens); "
          f"{n_params:,} parameters; {cfg.optimizer} lr {cfg.lr}, batch {cfg.batch}, TBPTT({cfg.k1}, "
          f"{cfg.k2 or cfg.k1}), {cfg.epochs} epoch(s) of {per_epoch} steps, device {cfg.device}", file=out)
    progress = _Progress(out, total, print_every)
    start, tokens, last, training_seconds = time.perf_counter(), 0, None, 0.0
    deadline = None if cfg.minutes is None else start + 60 * cfg.minutes
    while trainer.step < total and (deadline is None or time.perf_counter() < deadline):
        window_start = time.perf_counter()
        loss, n_tokens, _ = trainer.train_window()
        training_seconds += time.perf_counter() - window_start
        tokens += n_tokens
        trainer.history.append((trainer.step, loss))
        last = loss
        rate = tokens / max(training_seconds, 1e-9)
        progress.update(trainer.step, f"step {trainer.step}/{total} epoch {trainer.epoch + 1} loss "
                                      f"{_describe(loss, cfg.level)} {rate:,.0f} tokens/s")
        if cfg.eval_every and trainer.step % cfg.eval_every == 0:
            progress.close()
            valid = trainer.evaluate(corpus.valid)
            trainer.valid_history.append((trainer.step, valid))
            print(f"step {trainer.step}: validation {_describe(valid, cfg.level)}", file=out, flush=True)
            if checkpoint:
                trainer.save(checkpoint)
    progress.close()
    elapsed = time.perf_counter() - start
    valid = trainer.evaluate(corpus.valid)
    trainer.valid_history.append((trainer.step, valid))
    results = {"steps": trainer.step, "train_loss": last, "valid_loss": valid, "seconds": elapsed,
               "tokens_per_second": tokens / max(training_seconds, 1e-9)}
    print(f"after {trainer.step} steps ({elapsed:.0f} s; training {results['tokens_per_second']:,.0f} "
          f"tokens/s): "
          f"validation {_describe(valid, cfg.level)}", file=out)
    if corpus.test is not None and len(corpus.test) > 2:
        results["test_loss"] = trainer.evaluate(corpus.test)
        print(f"test {_describe(results['test_loss'], cfg.level)}", file=out)
    if checkpoint:
        trainer.save(checkpoint)
        print(f"checkpoint: {checkpoint}", file=out)
    if sample_length > 0:
        text = trainer.sample(sample_length)
        results["sample"] = text
        unit = "characters" if cfg.level == "char" else "words"
        print(f"--- sample ({sample_length} {unit}) ---\n{text}\n---", file=out)
    if plot:
        results["plot"] = _plot(plot, trainer, cfg.level, out)
    results["trainer"] = trainer
    return results


def _plot(path, trainer, level, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; pip install 'conveyor-rnn[plot]' (or matplotlib) to draw "
              "the curves. Training was not affected.", file=out)
        return None
    unit = "nats/char" if level == "char" else "nats/word"
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*trainer.history) if trainer.history else ((), ())
    ax.plot(steps, losses, label="training (per window)", alpha=0.6)
    if trainer.valid_history:
        vs, vl = zip(*trainer.valid_history)
        ax.plot(vs, vl, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel(f"cross-entropy ({unit})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}", file=out)
    return path
