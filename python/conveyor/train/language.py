"""The language-model task: embedding -> LSTM/GRU/RNN stack -> linear -> softmax cross-entropy over
characters or words, trained with truncated BPTT.

Weight tying between the embedding and the output layer (Press & Wolf 2017; needs embedding size = hidden
size), dropout on the embeddings, between layers and before the output (Zaremba, Sutskever & Vinyals 2014;
variational masks, Gal & Ghahramani 2016). The corpus is cut into B parallel streams that TBPTT(k1, k2)
walks window by window, carrying the state across windows and resetting it at each epoch, and, with
``--reset-at TOKEN``, in each stream after every TOKEN (a corpus of documents: none sees the last). The
non-recurrent parts are array code over ``xp``: NumPy on the CPU, CuPy when the layers run on the GPU, so
that activations never leave the device. Every random draw comes from --seed (initialisation) and
counter-based dropout masks keyed by (seed, step), so a run is deterministic and a checkpoint resumes it
exactly."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .._stack import mask_stream
from ..tbptt import TBPTT
from .config import Config
from .errors import UsageError
from .loop import Task, perplexity, sha256_of
from .model import CELLS, dropout_mask, regularisers, scatter_add, to_numpy, xp_for

# Dropout mask streams of the non-recurrent parts (the stack's own use layer << 16 | ...).
EMBEDDING_STREAM = mask_stream(0xFFFF, 0, 0)
OUTPUT_STREAM = mask_stream(0xFFFF, 0, 1)
BUNDLED = "data/tinyshakespeare.txt.gz"


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
    identity: dict  # {"path": absolute path or None (bundled), "sha256": of the bytes read}

    @property
    def index(self) -> dict:
        return {token: i for i, token in enumerate(self.vocab)}


def read_text(path: str, flag: str = "--data") -> str:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as error:
        raise UsageError(f"{flag}: {path} is not UTF-8 text (byte {error.start}: "
                         f"{error.object[error.start:error.start + 1]!r})") from error
    except (gzip.BadGzipFile, EOFError) as error:
        raise UsageError(f"{flag}: {path} is not a readable gzip file ({error})") from error


def tokens_of(text: str, level: str) -> list:
    if level == "char":
        return list(text)
    return text.replace("\n", " <eos> ").split()  # as Zaremba's PTB loader


def _find(directory: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    return None


def ptb_files(directory: str) -> list:
    paths = [_find(directory, f"ptb.{split}.txt") for split in ("train", "valid", "test")]
    if paths[0] is None or paths[1] is None:
        raise UsageError(f"--data: {directory} has no ptb.train.txt and ptb.valid.txt (or .gz)")
    return paths


def identity_of(data: str | None) -> dict:
    """What identifies the data of a run: its absolute path (None: bundled) and the sha256 of its bytes."""
    if data is None:
        with resources.files("conveyor").joinpath(BUNDLED).open("rb") as f:
            return {"path": None, "sha256": hashlib.sha256(f.read()).hexdigest()}
    if os.path.isdir(data):
        return {"path": os.path.abspath(data), "sha256": sha256_of([p for p in ptb_files(data) if p])}
    return {"path": os.path.abspath(data), "sha256": sha256_of([data])}


def load_corpus(data: str | None, level: str, vocab: list | None = None) -> Corpus:
    """``data``: None (the bundled Tiny Shakespeare), a directory holding PTB's ptb.{train,valid,test}.txt
    (optionally .gz), or one text file, split 90/5/5 in order. ``vocab``: a checkpoint's vocabulary (else
    the sorted tokens of the corpus)."""
    if data is None:
        with resources.files("conveyor").joinpath(BUNDLED).open("rb") as f:
            text = gzip.decompress(f.read()).decode("utf-8")
        splits = _split(tokens_of(text, level))
        source = "Tiny Shakespeare (bundled)"
    elif os.path.isdir(data):
        splits = [None if p is None else tokens_of(read_text(p), level) for p in ptb_files(data)]
        source = data
    elif os.path.isfile(data):
        splits = _split(tokens_of(read_text(data), level))
        source = data
    else:
        raise UsageError(f"--data: no such file or directory: {data}")
    identity = identity_of(data)
    if vocab is None:
        vocab = sorted({token for split in splits if split is not None for token in split})
    index = {token: i for i, token in enumerate(vocab)}
    train, valid, test = (None if s is None else ids_of(s, index, "--data") for s in splits)
    if len(train) < 2 or len(valid) < 2:
        raise UsageError(f"--data: {source} has too little text to train and validate on "
                         f"({len(train)} and {len(valid)} tokens)")
    return Corpus(level, vocab, train, valid, test, source, identity)


def ids_of(tokens: list, index: dict, flag: str) -> np.ndarray:
    """Token ids; a token outside the vocabulary becomes <unk> where the vocabulary has one, else is an
    error naming ``flag``."""
    unknown = index.get("<unk>")
    missing = {t for t in tokens if t not in index} if unknown is None else set()
    if missing:
        shown = ", ".join(repr(t) for t in sorted(missing)[:5])
        raise UsageError(f"{flag}: {len(missing)} token(s) not in the model's vocabulary ({shown})")
    return np.fromiter((index.get(t, unknown) for t in tokens), np.int64, len(tokens))


def _split(tokens: list) -> list:
    n = len(tokens)
    return [tokens[:int(0.9 * n)], tokens[int(0.9 * n):int(0.95 * n)], tokens[int(0.95 * n):]]


def streams(ids: np.ndarray, batch: int) -> np.ndarray:
    """[N, B]: the ids cut into B parallel streams read top to bottom (the tail that does not fill a row
    is dropped)."""
    n = len(ids) // batch
    return np.ascontiguousarray(ids[:n * batch].reshape(batch, n).T)


# ---------------------------------------------------------------------------------------------------------
# Model


class LanguageModel:
    """Embedding E [V, D] -> Conveyor stack -> output layer W [V, H], b [V]; W is E when tied."""

    def __init__(self, vocab_size: int, cfg: Config):
        if cfg.tie and cfg.embedding != cfg.hidden:
            raise UsageError(f"--tie: needs --embedding = --hidden, got {cfg.embedding} and {cfg.hidden}")
        self.cfg = cfg
        self.xp = xp_for(cfg.device)
        dtype = np.dtype(cfg.dtype)
        self.rnn = CELLS[cfg.cell](cfg.embedding, cfg.hidden, num_layers=cfg.layers, dropout=cfg.dropout,
                                   variational=cfg.variational, dtype=dtype, seed=cfg.seed,
                                   **regularisers(cfg))
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
        return dropout_mask(like, shape, self.cfg, stream, step)

    def embed(self, tokens, step):
        emb = self.params["embedding"][tokens]
        mask = self._mask(emb, emb.shape, EMBEDDING_STREAM, step)
        return (emb if mask is None else emb * mask), mask

    def logits(self, h):
        return h @ self.output_weight().T + self.params["output_bias"]

    def loss_and_output_grads(self, h, targets, step):
        """Mean cross-entropy of the window and, in training, the gradients of the output layer and of h."""
        xp = self.xp
        mask = self._mask(h, h.shape, OUTPUT_STREAM, step)
        hd = h if mask is None else h * mask
        T, B, H = hd.shape
        flat = hd.reshape(T * B, H)
        logits = self.logits(flat)
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


# ---------------------------------------------------------------------------------------------------------
# The task


class LanguageTask(Task):
    name = "lm"
    unit = "tokens"

    @staticmethod
    def defaults(cfg: Config) -> Config:
        return cfg.with_defaults(layers=2, hidden=256, embedding=64, batch=32, clip=5.0, epochs=1,
                                 lr=1.0 if cfg.optimizer == "sgd" else 2e-3, eval_every=100)

    def __init__(self, cfg: Config, corpus: Corpus | None = None, vocab: list | None = None):
        self.cfg = cfg
        self.corpus = load_corpus(cfg.data, cfg.level, vocab) if corpus is None else corpus
        self.identity = self.corpus.identity
        self.metric = "cross-entropy (nats/char)" if cfg.level == "char" else "cross-entropy (nats/word)"
        self.model = LanguageModel(len(self.corpus.vocab), cfg)
        self.xp = self.model.xp
        self.steps_per_epoch = 0
        if self.corpus.train is not None:  # None: a model to sample from, without its data
            self.train_streams = self.xp.asarray(streams(self.corpus.train, cfg.batch))
            if self.train_streams.shape[0] < cfg.k1 + 1:
                most = len(self.corpus.train) // (cfg.k1 + 1)
                raise UsageError(f"--batch: {cfg.batch} streams of the {len(self.corpus.train):,} training "
                                 f"tokens are shorter than one window of --bptt {cfg.k1} steps; expected "
                                 f"at most {most}")
            self.steps_per_epoch = math.ceil((self.train_streams.shape[0] - 1) / cfg.k1)
        self.tbptt = TBPTT(self.model.rnn, cfg.k1, cfg.k2)
        self._span = []  # (tokens, embedding mask, step) of the windows TBPTT can still reach back over
        self.reset_id = None
        if cfg.reset_at is not None:
            self.reset_id = self.corpus.index.get(cfg.reset_at)
            if self.reset_id is None:
                raise UsageError(f"--reset-at: {cfg.reset_at!r} is not a token of the corpus's vocabulary "
                                 f"({cfg.level} level)")

    def resets(self, data, start: int, n: int):
        """The TBPTT reset mask [n, B] of the window data[start:start + n] (None without --reset-at): true
        where the token before is the document separator, so the state starts again from zeros there."""
        if self.reset_id is None:
            return None
        previous = to_numpy(data[max(start - 1, 0):start + n - 1])
        mask = previous == self.reset_id
        if start == 0:  # the first step of the data has no token before it
            mask = np.concatenate([np.zeros((1, mask.shape[1]), bool), mask])
        return mask

    def header(self) -> str:
        cfg, corpus = self.cfg, self.corpus
        return (f"{cfg.layers}-layer {cfg.cell.upper()} of {cfg.hidden} units, language model on "
                f"{corpus.source} ({cfg.level} level, vocabulary {len(corpus.vocab)}, "
                f"{len(corpus.train):,} training tokens), TBPTT({cfg.k1}, {cfg.k2 or cfg.k1})")

    def describe(self, loss: float) -> str:
        if self.cfg.level == "char":
            return f"{loss:.4f} nats/char ({loss / math.log(2):.3f} bits/char)"
        return f"{loss:.4f} (perplexity {perplexity(loss):.2f})"

    def params(self) -> dict:
        return self.model.all_params()

    def set_params(self, arrays: dict) -> None:
        for name in list(self.model.params):
            self.model.params[name] = arrays[name]
        self.model.rnn.params = {k: arrays[f"rnn.{k}"] for k in self.model.rnn.params}

    def has_split(self, split: str) -> bool:
        ids = getattr(self.corpus, split)
        return ids is not None and len(ids) > 2

    # -- training ---------------------------------------------------------------------------------------
    def window_gradients(self, tokens, targets, step, reset=None):
        """The loss of one window and the gradients of every parameter (TBPTT over the last k2 steps):
        (loss, {name: gradient}) with the names of ``params()``."""
        cfg, xp, model = self.cfg, self.xp, self.model
        model.rnn.train()
        emb, emb_mask = model.embed(tokens, step)
        h = self.tbptt.forward(emb, reset=reset)
        loss, grads, dh = model.loss_and_output_grads(h, targets, step)
        d_emb = self.tbptt.backward(dh)
        self._span.append((tokens, emb_mask, step))
        reach = cfg.k1 if cfg.k2 is None else cfg.k2
        while sum(chunk[0].shape[0] for chunk in self._span[1:]) >= reach:
            self._span.pop(0)
        span = d_emb.shape[0]  # the steps TBPTT went back over, the newest last
        span_tokens = xp.concatenate([chunk[0] for chunk in self._span])[-span:]
        if emb_mask is not None:
            d_emb = d_emb * xp.concatenate([chunk[1] for chunk in self._span])[-span:]
        d_embedding = xp.zeros_like(model.params["embedding"])
        scatter_add(xp, d_embedding, span_tokens.reshape(-1), d_emb.reshape(-1, d_emb.shape[-1]))
        output_weight_grad = grads.pop("_output_weight")
        if cfg.tie:
            d_embedding += output_weight_grad
        else:
            grads["output_weight"] = output_weight_grad
        grads["embedding"] = d_embedding
        return loss, {**grads, **{f"rnn.{k}": v for k, v in model.rnn.grads.items()}}

    def train_batch(self, epoch, position, step):
        k1 = self.cfg.k1
        if position == 0:
            self.tbptt.reset()
            self._span = []
        start = position * k1
        n = min(k1, self.train_streams.shape[0] - 1 - start)
        loss, grads = self.window_gradients(self.train_streams[start:start + n],
                                            self.train_streams[start + 1:start + n + 1], step,
                                            self.resets(self.train_streams, start, n))
        return loss, n * self.cfg.batch, grads

    def evaluate(self, split: str) -> float:
        ids = getattr(self.corpus, split) if isinstance(split, str) else split
        return self.evaluate_ids(ids)

    def evaluate_ids(self, ids: np.ndarray) -> float:
        """Mean cross-entropy per token over ``ids``, in evaluation mode (no dropout)."""
        cfg, xp, model = self.cfg, self.xp, self.model
        model.rnn.eval()
        data = xp.asarray(streams(ids, max(1, min(cfg.eval_batch, len(ids) // 2))))
        tb = TBPTT(model.rnn, cfg.k1)
        total, count = 0.0, 0
        for start in range(0, data.shape[0] - 1, cfg.k1):
            n = min(cfg.k1, data.shape[0] - 1 - start)
            emb, _ = model.embed(data[start:start + n], 0)
            h = tb.forward(emb, reset=self.resets(data, start, n))
            loss, _, _ = model.loss_and_output_grads(h, data[start + 1:start + n + 1], 0)
            total += loss * n
            count += n
        model.rnn.train()
        return total / count

    def sample(self, length: int, temperature: float = 0.8, prime: str | None = None, seed: int | None = None
               ) -> str:
        """Text generated one token at a time (evaluation mode), continuing ``prime``."""
        xp, model, corpus = self.xp, self.model, self.corpus
        model.rnn.eval()
        rng = np.random.default_rng([self.cfg.seed if seed is None else seed, 2])
        index = corpus.index
        if prime is None:
            prime = "\n" if corpus.level == "char" and "\n" in index else corpus.vocab[0]
        prime_tokens = tokens_of(prime, corpus.level)
        if not prime_tokens:
            raise UsageError("--prime: expected at least one token, got an empty text")
        tokens = list(ids_of(prime_tokens, index, "--prime"))
        tb = TBPTT(model.rnn, len(tokens))
        h = tb.forward(model.embed(xp.asarray(np.array(tokens)[:, None]), 0)[0])
        out = []
        for _ in range(length):
            logits = to_numpy(model.logits(h[-1, 0])).astype(np.float64) / temperature
            p = np.exp(logits - logits.max())
            token = int(rng.choice(len(p), p=p / p.sum()))
            out.append(corpus.vocab[token])
            h = tb.forward(model.embed(xp.asarray(np.array([[token]])), 0)[0])
        model.rnn.train()
        if corpus.level == "char":
            return "".join(out)
        return " ".join(out).replace(" <eos> ", "\n").replace("<eos>", "\n")

    def finish(self, out, results, sample_length):
        if sample_length > 0:
            text = self.sample(sample_length)
            results["sample"] = text
            unit = "characters" if self.cfg.level == "char" else "words"
            print(f"--- sample ({sample_length} {unit}) ---\n{text}\n---", file=out)

    # -- checkpoints ------------------------------------------------------------------------------------
    def state(self):
        record = {"vocab": self.corpus.vocab, "rnn_windows": self.model.rnn._windows}
        arrays = {}
        h, c = self.tbptt.state
        if h is not None:
            arrays["state.h"] = h
        if c is not None:
            arrays["state.c"] = c
        if self._span:
            # TBPTT(k1, k2 > k1) reaches back over earlier windows: keep their saved values and tokens.
            history, info = self.tbptt.export_history()
            arrays.update({f"history.{k}": v for k, v in history.items()})
            arrays["span.tokens"] = self.xp.concatenate([chunk[0] for chunk in self._span])
            record["span"] = {"history": info, "steps": [chunk[2] for chunk in self._span],
                              "lengths": [int(chunk[0].shape[0]) for chunk in self._span]}
        return record, arrays

    def load_state(self, record, arrays):
        self.model.rnn._windows = record["rnn_windows"]
        self.tbptt.reset()
        self._span = []
        if "span" in record:
            history = {k[len("history."):]: v for k, v in arrays.items() if k.startswith("history.")}
            self.tbptt.import_history(history, record["span"]["history"])
            self.model.rnn.train()
            tokens, offset = arrays["span.tokens"], 0
            for step, length in zip(record["span"]["steps"], record["span"]["lengths"]):
                chunk = tokens[offset:offset + length]
                offset += length
                self._span.append((chunk, self.model.embed(chunk, step)[1], step))
        self.tbptt.state = (arrays.get("state.h"), arrays.get("state.c"))

    @staticmethod
    def data_identity(cfg: Config) -> dict:
        return identity_of(cfg.data)

    @classmethod
    def from_checkpoint(cls, cfg: Config, record: dict, with_data: bool = True) -> LanguageTask:
        if with_data:
            return cls(cfg, vocab=record["vocab"])
        vocab = record["vocab"]
        return cls(cfg, Corpus(cfg.level, vocab, None, None, None, "", {"path": cfg.data, "sha256": ""}))
