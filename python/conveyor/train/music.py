"""The polyphonic-music task (Boulanger-Lewandowski, Bengio & Vincent 2012; Chung, Gulcehre, Cho & Bengio
2014): next-frame prediction of 88-key piano rolls. Each frame is 88 notes on or off (MIDI 21..108); a
one-layer recurrent network reads frame t and predicts the notes of frame t+1 through 88 sigmoids. The loss
is the Bernoulli negative log-likelihood summed over the 88 keys, per predicted frame (T_i - 1 of them for a
piece of T_i frames), the figure the papers report. A batch is whole pieces, padded to its longest; each
piece runs its own frames only (the layers' ``lengths``: the padding costs no arithmetic) and the padding
carries no loss, so the gradients are exactly those of the pieces alone.

Data: the ``.mat`` files of the four standard sets (``traindata``, ``validdata``, ``testdata`` cell arrays of
[T_i, 88] 0/1 piano rolls; read with SciPy) or the original ``.pickle`` files (``train``, ``valid``, ``test``:
lists of pieces, each a list of frames, each a list of MIDI note numbers)."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np

from .config import Config
from .errors import UsageError
from .loop import Task, sha256_of
from .model import CELLS, HeadAndLayer, regularisers, xp_for

KEYS = 88
LOWEST_NOTE = 21  # MIDI number of key 0 (A0)
# Chung et al. 2014, Table 2: units giving about 20k parameters for each cell.
PAPER_UNITS = {"rnn": 100, "gru": 46, "lstm": 36}
SPLITS = ("train", "valid", "test")


class _PlainData(pickle.Unpickler):
    """Unpickles lists, dicts, numbers and strings only: a data file must not run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not plain data")


def _from_mat(path: str) -> dict:
    try:
        import scipy.io
    except ImportError as error:
        raise UsageError(f"--data: reading {os.path.basename(path)} needs SciPy (pip install scipy), or "
                         "give the .pickle version of the data set") from error
    try:
        mat = scipy.io.loadmat(path)
    except Exception as error:  # SciPy raises several types for files that are not MATLAB files
        raise UsageError(f"--data: {path} is not a readable .mat file ({error})") from error
    missing = [f"{s}data" for s in SPLITS if f"{s}data" not in mat]
    if missing:
        raise UsageError(f"--data: {path} has no {', '.join(missing)} (expected traindata, validdata, "
                         "testdata piano rolls)")
    return {split: [np.asarray(piece) for piece in mat[f"{split}data"].ravel()] for split in SPLITS}


def _from_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = _PlainData(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise UsageError(f"--data: {path} is not a piano-roll pickle ({error})") from error
    if not isinstance(data, dict) or any(s not in data for s in SPLITS):
        raise UsageError(f"--data: {path} should hold a dict with keys train, valid, test")
    rolls = {}
    for split in SPLITS:
        pieces = []
        for piece in data[split]:
            roll = np.zeros((len(piece), KEYS), np.uint8)
            for t, notes in enumerate(piece):
                keys = np.asarray(list(notes), np.int64) - LOWEST_NOTE
                if keys.size and (keys.min() < 0 or keys.max() >= KEYS):
                    raise UsageError(f"--data: {path}: a note outside MIDI 21..108 in the {split} split")
                roll[t, keys] = 1
            pieces.append(roll)
        rolls[split] = pieces
    return rolls


def load_rolls(path: str | None) -> tuple[dict, dict]:
    """({split: [piano roll [T_i, 88] as float32]}, identity) of a .mat or .pickle data set."""
    if path is None:
        raise UsageError("--data: the music task needs a data set (a .mat or .pickle file of piano rolls, "
                         "e.g. JSB_Chorales.mat)")
    if not os.path.isfile(path):
        raise UsageError(f"--data: no such file: {path}")
    rolls = _from_mat(path) if path.lower().endswith(".mat") else _from_pickle(path)
    for split in SPLITS:
        pieces = [p for p in rolls[split] if p.ndim == 2 and p.shape[0] >= 2]
        if any(p.ndim != 2 or p.shape[1] != KEYS for p in rolls[split]):
            raise UsageError(f"--data: {path}: expected pieces of [T, {KEYS}] frames in the {split} split")
        rolls[split] = [np.ascontiguousarray(p, np.float32) for p in pieces]
    if not rolls["train"] or not rolls["valid"]:
        raise UsageError(f"--data: {path} has no training or validation piece of two frames or more")
    return rolls, {"path": os.path.abspath(path), "sha256": sha256_of([path])}


def _bernoulli_nll(xp, logits, target):
    """Elementwise -log p(target | sigmoid(logits)), stable for any logit."""
    return xp.maximum(logits, 0) - logits * target + xp.log1p(xp.exp(-xp.abs(logits)))


class MusicTask(HeadAndLayer, Task):
    name = "music"
    unit = "frames"
    metric = "NLL per frame (nats)"

    @staticmethod
    def defaults(cfg: Config) -> Config:
        return cfg.with_defaults(layers=1, hidden=PAPER_UNITS[cfg.cell], batch=8, lr=3e-3, clip=1.0,
                                 epochs=100, keep_best=True)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rolls, self.identity = load_rolls(cfg.data)
        self.xp = xp_for(cfg.device)
        dtype = np.dtype(cfg.dtype)
        self.rnn = CELLS[cfg.cell](KEYS, cfg.hidden, num_layers=cfg.layers, dropout=cfg.dropout,
                                   variational=cfg.variational, dtype=dtype, seed=cfg.seed,
                                   **regularisers(cfg))
        rng = np.random.default_rng([cfg.seed, 1])
        bound = 1.0 / math.sqrt(cfg.hidden)
        self.head = {"output_weight": rng.uniform(-bound, bound, (KEYS, cfg.hidden)).astype(dtype),
                     "output_bias": np.zeros(KEYS, dtype)}
        self.head = {k: self.xp.asarray(v) for k, v in self.head.items()}
        if cfg.device == "cuda":
            self.rnn.to("cuda")
        self.steps_per_epoch = math.ceil(len(self.rolls["train"]) / cfg.batch)
        if cfg.eval_every is None:  # validate once an epoch
            self.cfg = cfg.replace(eval_every=self.steps_per_epoch)

    def header(self) -> str:
        cfg, r = self.cfg, self.rolls
        frames = sum(p.shape[0] for p in r["train"])
        return (f"{cfg.layers}-layer {cfg.cell.upper()} of {cfg.hidden} units, next-frame prediction of "
                f"piano rolls from {os.path.basename(cfg.data)} ({len(r['train'])} training pieces, "
                f"{frames:,} frames)")

    def describe(self, loss: float) -> str:
        return f"{loss:.3f} nats/frame"

    def has_split(self, split: str) -> bool:
        return bool(self.rolls.get(split))

    def _batch(self, pieces):
        """(inputs [L, B, 88], targets [L, B, 88], mask [L, B, 1]) with L the longest piece's length - 1."""
        length = max(p.shape[0] for p in pieces) - 1
        frames = np.zeros((length + 1, len(pieces), KEYS), np.float32)
        mask = np.zeros((length, len(pieces), 1), np.float32)
        for b, piece in enumerate(pieces):
            frames[:piece.shape[0], b] = piece
            mask[:piece.shape[0] - 1, b] = 1
        dtype = np.dtype(self.cfg.dtype)
        xp = self.xp
        return (xp.asarray(frames[:-1].astype(dtype)), xp.asarray(frames[1:].astype(dtype)),
                xp.asarray(mask.astype(dtype)))

    def _loss(self, pieces, training: bool):
        """(summed NLL, predicted frames, gradients of the mean NLL per frame or None)."""
        xp = self.xp
        x, target, mask = self._batch(pieces)
        self.rnn.train(training)
        # A piece of n frames predicts n - 1 (one of a single frame predicts none: its step carries no loss).
        y = self.rnn(x, lengths=np.array([max(p.shape[0] - 1, 1) for p in pieces]))[0]
        logits = y @ self.head["output_weight"].T + self.head["output_bias"]
        total = float((_bernoulli_nll(xp, logits, target) * mask).sum())
        frames = float(mask.sum())
        if not training:
            return total, frames, None
        dlogits = (1 / (1 + xp.exp(-logits)) - target) * mask / frames
        grads = {"output_weight": xp.einsum("tbk,tbh->kh", dlogits, y),
                 "output_bias": dlogits.sum(axis=(0, 1))}
        self.rnn.backward(xp.ascontiguousarray(dlogits @ self.head["output_weight"]))
        grads.update({f"rnn.{k}": v for k, v in self.rnn.grads.items()})
        return total, frames, grads

    def train_batch(self, epoch, position, step):
        order = np.random.default_rng([self.cfg.seed, 3, epoch]).permutation(len(self.rolls["train"]))
        chosen = order[position * self.cfg.batch:(position + 1) * self.cfg.batch]
        total, frames, grads = self._loss([self.rolls["train"][i] for i in chosen], training=True)
        return total / frames, int(frames), grads

    def evaluate(self, split: str) -> float:
        pieces = sorted(self.rolls[split], key=len)  # like lengths together: less padding
        total = frames = 0.0
        for start in range(0, len(pieces), self.cfg.eval_batch):
            t, f, _ = self._loss(pieces[start:start + self.cfg.eval_batch], training=False)
            total, frames = total + t, frames + f
        self.rnn.train()
        return total / frames

    def state(self):
        return {"rnn_windows": self.rnn._windows}, {}

    def load_state(self, record, arrays):
        self.rnn._windows = record["rnn_windows"]

    @staticmethod
    def data_identity(cfg: Config) -> dict:
        return {"path": os.path.abspath(cfg.data), "sha256": sha256_of([cfg.data])}

    @classmethod
    def from_checkpoint(cls, cfg: Config, record: dict) -> MusicTask:
        return cls(cfg)
