"""The text-classification task, the Keras example of a bidirectional LSTM (``Embedding(max_features, 128)``,
``Bidirectional(LSTM(64))``, ``Dense(2)`` with softmax): words -> embedding -> a bidirectional recurrent
layer -> the last states of both directions, concatenated -> dropout -> a linear layer -> softmax
cross-entropy over the labels.

Data: ``label<TAB>text`` per line, one file (split 80/10/10 after a fixed shuffle, so that the split is a
property of the file) or a folder with ``train.tsv``, ``valid.tsv`` and optionally ``test.tsv``. Words are
the lower-cased runs of letters and digits and each punctuation mark; the ``--vocabulary`` most frequent
training words are kept, the others become ``<unk>``; a text longer than ``--max-length`` words keeps its
last ones (as Keras's ``pad_sequences``). A batch holds texts of one length, so that no padding enters
either direction and the last states are exactly those of each text."""

from __future__ import annotations

import math
import os
import re
from collections import Counter

import numpy as np

from .config import Config
from .errors import UsageError
from .language import read_text
from .loop import Task, sha256_of
from .model import CELLS, HeadAndLayer, dropout_mask, regularisers, scatter_add, xp_for

UNKNOWN = "<unk>"
FEATURES_STREAM = 0xFFFF << 16 | 2  # dropout on the concatenated last states
WORD = re.compile(r"\w+|[^\w\s]")


def words_of(text: str) -> list:
    return WORD.findall(text.lower())


def _read_tsv(path: str) -> list:
    examples = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab or not label.strip():
            raise UsageError(f"--data: {path} line {number}: expected label<TAB>text, got {line[:60]!r}")
        examples.append((label.strip(), text))
    return examples


def _split_files(data: str) -> dict:
    paths = {s: os.path.join(data, f"{s}.tsv") for s in ("train", "valid", "test")}
    if not (os.path.isfile(paths["train"]) and os.path.isfile(paths["valid"])):
        raise UsageError(f"--data: {data} has no train.tsv and valid.tsv")
    return {s: p for s, p in paths.items() if os.path.isfile(p)}


def identity_of(data: str) -> dict:
    files = list(_split_files(data).values()) if os.path.isdir(data) else [data]
    return {"path": os.path.abspath(data), "sha256": sha256_of(files)}


def load_examples(data: str | None) -> tuple[dict, dict]:
    """({split: [(label, text)]}, identity)."""
    if data is None:
        raise UsageError("--data: the classify task needs labelled text (a label<TAB>text file, or a folder "
                         "with train.tsv and valid.tsv)")
    if os.path.isdir(data):
        splits = {s: _read_tsv(p) for s, p in _split_files(data).items()}
    elif os.path.isfile(data):
        examples = _read_tsv(data)
        order = np.random.default_rng(0).permutation(len(examples))
        n_train, n_valid = int(0.8 * len(examples)), int(0.1 * len(examples))
        splits = {"train": [examples[i] for i in order[:n_train]],
                  "valid": [examples[i] for i in order[n_train:n_train + n_valid]],
                  "test": [examples[i] for i in order[n_train + n_valid:]]}
    else:
        raise UsageError(f"--data: no such file or directory: {data}")
    if len(splits["train"]) < 2 or not splits["valid"]:
        raise UsageError(f"--data: {data} has too few examples to train and validate on "
                         f"({len(splits['train'])} and {len(splits['valid'])})")
    return splits, identity_of(data)


def order_dataset(n: int, seed: int = 0) -> list:
    """(label, text) examples whose label depends on word order alone: every text holds the words 'alpha'
    and 'omega' among random filler words, labelled 'alpha-first' or 'omega-first'. A bag of words sees the
    same words in both classes, so it cannot do better than chance."""
    rng = np.random.default_rng(seed)
    fillers = [f"w{i}" for i in range(30)]
    examples = []
    for _ in range(n):
        length = int(rng.integers(4, 11))
        words = list(rng.choice(fillers, length))
        first, second = sorted(rng.choice(length + 1, 2, replace=False))
        alpha_first = bool(rng.integers(2))
        words.insert(first, "alpha" if alpha_first else "omega")
        words.insert(second + 1, "omega" if alpha_first else "alpha")
        examples.append(("alpha-first" if alpha_first else "omega-first", " ".join(words)))
    return examples


class ClassifyTask(HeadAndLayer, Task):
    name = "classify"
    unit = "examples"
    metric = "cross-entropy (nats per example)"

    @staticmethod
    def defaults(cfg: Config) -> Config:
        return cfg.with_defaults(layers=1, hidden=64, embedding=128, batch=32, lr=1e-3, clip=5.0, epochs=2,
                                 max_length=100, vocabulary=20000)

    def __init__(self, cfg: Config, vocab: list | None = None, labels: list | None = None):
        self.cfg = cfg
        splits, self.identity = load_examples(cfg.data)
        if vocab is None:
            counts = Counter(w for _, text in splits["train"] for w in words_of(text))
            ranked = sorted(counts, key=lambda w: (-counts[w], w))[:cfg.vocabulary - 1]
            vocab = [UNKNOWN] + ranked
        if labels is None:
            labels = sorted({label for label, _ in splits["train"]})
        if len(labels) < 2:
            raise UsageError(f"--data: expected at least two labels in the training split, got {labels}")
        self.vocab, self.labels = vocab, labels
        self.index = {w: i for i, w in enumerate(vocab)}
        self.splits = {s: self._encode(examples, s) for s, examples in splits.items()}
        self.xp = xp = xp_for(cfg.device)
        dtype = np.dtype(cfg.dtype)
        self.rnn = CELLS[cfg.cell](cfg.embedding, cfg.hidden, num_layers=cfg.layers, bidirectional=True,
                                   dtype=dtype, seed=cfg.seed, **regularisers(cfg))
        rng = np.random.default_rng([cfg.seed, 1])
        bound = 1.0 / math.sqrt(2 * cfg.hidden)
        self.head = {"embedding": rng.uniform(-0.1, 0.1, (len(vocab), cfg.embedding)).astype(dtype),
                     "output_weight": rng.uniform(-bound, bound, (len(labels), 2 * cfg.hidden)).astype(dtype),
                     "output_bias": np.zeros(len(labels), dtype)}
        self.head = {k: xp.asarray(v) for k, v in self.head.items()}
        if cfg.device == "cuda":
            self.rnn.to("cuda")
        self.accuracy = {}
        self._buckets = self._by_length(self.splits["train"][0])
        self.steps_per_epoch = sum(math.ceil(len(rows) / cfg.batch) for rows in self._buckets.values())

    def _encode(self, examples, split):
        """(token ids of each text, label ids) of a split."""
        label_index = {label: i for i, label in enumerate(self.labels)}
        unknown = sorted({label for label, _ in examples if label not in label_index})
        if unknown:
            raise UsageError(f"--data: labels {unknown[:5]} of the {split} split are not among the "
                             f"training labels {self.labels[:10]}")
        ids = []
        for _, text in examples:
            words = words_of(text)[-self.cfg.max_length:] or [UNKNOWN]
            ids.append(np.array([self.index.get(w, 0) for w in words], np.int64))
        return ids, np.array([label_index[label] for label, _ in examples], np.int64)

    @staticmethod
    def _by_length(texts) -> dict:
        buckets = {}
        for i, ids in enumerate(texts):
            buckets.setdefault(len(ids), []).append(i)
        return dict(sorted(buckets.items()))

    def header(self) -> str:
        cfg = self.cfg
        return (f"embedding {cfg.embedding} -> bidirectional {cfg.layers}-layer {cfg.cell.upper()} of "
                f"{cfg.hidden} units -> {len(self.labels)} labels, on {cfg.data} "
                f"({len(self.splits['train'][1]):,} training texts, vocabulary {len(self.vocab):,})")

    def describe(self, loss: float) -> str:
        return f"{loss:.4f} nats"

    def describe_split(self, split: str, loss: float) -> str:
        return f"{loss:.4f} nats, accuracy {self.accuracy[split]:.1%}"

    def has_split(self, split: str) -> bool:
        return split in self.splits and len(self.splits[split][1]) > 0

    # -- one batch of texts of one length -------------------------------------------------------------------
    def _loss(self, tokens, labels, training: bool, step: int = 0):
        """(summed loss, correct predictions, gradients of the mean loss or None)."""
        xp, rnn, cfg = self.xp, self.rnn, self.cfg
        tokens, labels = xp.asarray(tokens), xp.asarray(labels)
        T, B = tokens.shape
        rnn.train(training)
        x = self.head["embedding"][tokens]
        y, h_n, *_ = rnn(x)
        features = xp.concatenate([h_n[-2], h_n[-1]], axis=1)  # last layer: forward, then reverse
        mask = None
        if training and cfg.dropout > 0:
            mask = dropout_mask(features, (1,) + features.shape, cfg, FEATURES_STREAM, step)[0]
            features = features * mask
        logits = features @ self.head["output_weight"].T + self.head["output_bias"]
        logits = logits - logits.max(axis=1, keepdims=True)
        log_norm = xp.log(xp.exp(logits).sum(axis=1))
        rows = xp.arange(B)
        total = float((log_norm - logits[rows, labels]).sum())
        correct = int((logits.argmax(axis=1) == labels).sum())
        if not training:
            return total, correct, None
        dlogits = xp.exp(logits - log_norm[:, None])
        dlogits[rows, labels] -= 1
        dlogits /= B
        grads = {"output_weight": dlogits.T @ features, "output_bias": dlogits.sum(axis=0)}
        dfeatures = dlogits @ self.head["output_weight"]
        if mask is not None:
            dfeatures = dfeatures * mask
        H = cfg.hidden
        dh_n = xp.zeros(h_n.shape, h_n.dtype)
        dh_n[-2], dh_n[-1] = dfeatures[:, :H], dfeatures[:, H:]
        dx = rnn.backward(xp.zeros(y.shape, y.dtype), dh_n)[0]
        d_embedding = xp.zeros_like(self.head["embedding"])
        scatter_add(xp, d_embedding, tokens.reshape(-1), dx.reshape(T * B, -1))
        grads["embedding"] = d_embedding
        grads.update({f"rnn.{k}": v for k, v in rnn.grads.items()})
        return total, correct, grads

    def _stack(self, split, rows):
        texts, labels = self.splits[split]
        return np.stack([texts[i] for i in rows], axis=1), labels[rows]

    def train_batch(self, epoch, position, step):
        rng = np.random.default_rng([self.cfg.seed, 4, epoch])
        batches = []
        for rows in self._buckets.values():
            rows = rng.permutation(rows)
            batches += [rows[i:i + self.cfg.batch] for i in range(0, len(rows), self.cfg.batch)]
        chosen = batches[rng.permutation(len(batches))[position]]
        tokens, labels = self._stack("train", chosen)
        total, _, grads = self._loss(tokens, labels, training=True, step=step)
        return total / len(chosen), len(chosen), grads

    def evaluate(self, split: str) -> float:
        texts, labels = self.splits[split]
        total = correct = 0.0
        for rows in self._by_length(texts).values():
            for i in range(0, len(rows), self.cfg.eval_batch):
                t, c, _ = self._loss(*self._stack(split, rows[i:i + self.cfg.eval_batch]), training=False)
                total, correct = total + t, correct + c
        self.rnn.train()
        self.accuracy[split] = correct / len(labels)
        return total / len(labels)

    def finish(self, out, results, sample_length):
        split = "test" if "test_loss" in results else "valid"
        results["accuracy"] = self.accuracy[split]
        print(f"held-out accuracy ({split}, {len(self.splits[split][1]):,} texts): "
              f"{self.accuracy[split]:.1%}", file=out)

    def state(self):
        return {"vocab": self.vocab, "labels": self.labels, "rnn_windows": self.rnn._windows}, {}

    def load_state(self, record, arrays):
        self.rnn._windows = record["rnn_windows"]

    @staticmethod
    def data_identity(cfg: Config) -> dict:
        return identity_of(cfg.data)

    @classmethod
    def from_checkpoint(cls, cfg: Config, record: dict) -> ClassifyTask:
        return cls(cfg, vocab=record["vocab"], labels=record["labels"])
