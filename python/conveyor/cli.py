"""The ``conveyor`` command.

``conveyor demo`` trains a small recurrent network on a toy memory task (echo the input bit seen ``--delay``
steps ago) and prints the loss falling; ``conveyor info`` says what this installation has.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import GRU, LSTM, RNN, __version__, _conveyor

_LAYERS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


class _Adam:
    """Adam (Kingma & Ba 2015) over a dict of parameter arrays, updated in place."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.betas, self.eps, self.step_count = lr, betas, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        correction = np.sqrt(1 - b2**self.step_count) / (1 - b1**self.step_count)
        for name, g in grads.items():
            self.m[name] = b1 * self.m[name] + (1 - b1) * g
            self.v[name] = b2 * self.v[name] + (1 - b2) * g * g
            params[name] -= self.lr * correction * self.m[name] / (np.sqrt(self.v[name]) + self.eps)


def _delayed_bits(rng, steps: int, batch: int, delay: int):
    """Random bits in, the bit from `delay` steps earlier out (0 before the sequence has one)."""
    bits = rng.integers(0, 2, size=(steps, batch, 1)).astype(np.float32)
    target = np.zeros_like(bits)
    target[delay:] = bits[:-delay]
    return bits, target


def demo(args) -> int:
    rng = np.random.default_rng(args.seed)
    layer = _LAYERS[args.cell](1, args.hidden, seed=args.seed)
    readout = {"weight": rng.uniform(-0.1, 0.1, (1, args.hidden)).astype(np.float32),
               "bias": np.zeros(1, np.float32)}
    adam_layer, adam_readout = _Adam(layer.params, args.lr), _Adam(readout, args.lr)
    print(f"conveyor {__version__}: training a {args.hidden}-unit {args.cell.upper()} to echo the bit it "
          f"saw {args.delay} steps ago (windows of {args.window} steps, batch {args.batch}, "
          f"Adam lr {args.lr})")
    start, first_loss, loss = time.perf_counter(), None, float("nan")
    for step in range(1, args.steps + 1):
        x, target = _delayed_bits(rng, args.window, args.batch, args.delay)
        y = layer(x)[0]
        logits = y @ readout["weight"].T + readout["bias"]
        p = 1.0 / (1.0 + np.exp(-logits))
        # Binary cross-entropy averaged over every (step, row); the first `delay` steps recall nothing.
        scored = slice(args.delay, None)
        n = p[scored].size
        loss = float(-np.mean(target[scored] * np.log(p[scored] + 1e-7)
                              + (1 - target[scored]) * np.log(1 - p[scored] + 1e-7)))
        accuracy = float(np.mean((p[scored] > 0.5) == (target[scored] > 0.5)))
        first_loss = loss if first_loss is None else first_loss
        dlogits = np.zeros_like(p)
        dlogits[scored] = (p[scored] - target[scored]) / n
        readout_grads = {"weight": np.einsum("tbo,tbh->oh", dlogits, y),
                         "bias": dlogits.sum(axis=(0, 1))}
        layer.backward(np.ascontiguousarray(dlogits @ readout["weight"]))
        adam_layer.step(layer.params, layer.grads)
        adam_readout.step(readout, readout_grads)
        if step == 1 or step % args.print_every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss:.4f}  accuracy {accuracy:6.1%}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"loss {first_loss:.4f} -> {loss:.4f}")
    return 0


def info(_args) -> int:
    print(f"conveyor {__version__}")
    emulated = " (emulated on the CPU: a test build)" if _conveyor.cuda_emulated() else ""
    print(f"CUDA backend built: {_conveyor.cuda_built()}{emulated}")
    print(f"CUDA available:     {_conveyor.cuda_available()} ({_conveyor.cuda_device_count()} device(s))")
    if _conveyor.cuda_built():
        print("CUDA recurrence:    algorithm='auto' runs the persistent kernels where they fit on the "
              "device and B <= 32, else one launch per step (CONVEYOR_LOG_ALGORITHM=1 prints each choice)")
    print(f"CPU threads:        {_conveyor.num_threads()}")
    return 0


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value
    return parse


def _probability(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text}")
    return value


def train(args) -> int:
    from . import lm

    if args.k2 is not None and args.k2 < args.bptt:
        raise SystemExit(f"--bptt2: expected at least --bptt ({args.bptt}), got {args.k2}")
    cfg = lm.Config(cell=args.cell, level=args.level, embedding=args.embedding, hidden=args.hidden,
                    layers=args.layers, dropout=args.dropout, variational=args.variational, tie=args.tie,
                    batch=args.batch, k1=args.bptt, k2=args.k2, optimizer=args.optimizer,
                    lr=args.lr if args.lr is not None else (1.0 if args.optimizer == "sgd" else 2e-3),
                    lr_decay=args.lr_decay, decay_after=args.decay_after, clip=args.clip, epochs=args.epochs,
                    max_steps=args.max_steps, minutes=args.minutes, eval_every=args.eval_every,
                    eval_batch=args.eval_batch, seed=args.seed, device=args.device)
    try:
        corpus = lm.load_corpus(args.data, args.level)
    except (OSError, ValueError) as error:
        raise SystemExit(str(error)) from error
    lm.run(cfg, corpus, checkpoint=args.checkpoint, resume=args.resume, sample_length=args.sample,
           plot=args.plot, print_every=args.print_every)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor", description="Fast LSTM, GRU and RNN layers.")
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="train a small recurrent network on a toy memory task")
    d.add_argument("--cell", choices=sorted(_LAYERS), default="lstm")
    d.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    d.add_argument("--delay", type=int, default=4, help="how many steps back to recall (default 4)")
    d.add_argument("--window", type=int, default=32, help="steps per window (default 32)")
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    d.add_argument("--lr", type=float, default=0.01)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--print-every", type=int, default=25)
    d.set_defaults(run=demo)
    t = commands.add_parser(
        "train", help="train a character- or word-level language model (default: Tiny Shakespeare, bundled)",
        description="Trains embedding -> LSTM/GRU stack -> softmax on a text corpus with truncated BPTT. "
                    "Defaults: a 2-layer LSTM of 256 units on the bundled Tiny Shakespeare, 300 Adam steps.")
    t.add_argument("--data", help="a text file, or a directory with ptb.{train,valid,test}.txt "
                                  "(default: the bundled Tiny Shakespeare)")
    t.add_argument("--level", choices=("char", "word"), default="char")
    t.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    t.add_argument("--layers", type=_positive(int), default=2)
    t.add_argument("--hidden", type=_positive(int), default=256)
    t.add_argument("--embedding", type=_positive(int), default=64)
    t.add_argument("--tie", action="store_true", help="tie the embedding and output weights (Press & Wolf "
                                                      "2017; needs --embedding = --hidden)")
    t.add_argument("--dropout", type=_probability, default=0.0,
                   help="dropout on embeddings, between layers and before the output (Zaremba et al. 2014)")
    t.add_argument("--variational", action="store_true", help="one dropout mask per window (Gal & "
                                                              "Ghahramani 2016)")
    t.add_argument("--batch", type=_positive(int), default=32, help="parallel streams (default 32)")
    t.add_argument("--bptt", type=_positive(int), default=64, help="TBPTT k1: steps per window (default 64)")
    t.add_argument("--bptt2", dest="k2", type=_positive(int), default=None,
                   help="TBPTT k2 >= k1: steps to backpropagate through (default: k1)")
    t.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    t.add_argument("--lr", type=_positive(float), default=None, help="default 2e-3 (Adam), 1.0 (SGD)")
    t.add_argument("--lr-decay", type=_positive(float), default=1.0, help="SGD: multiply lr by this ...")
    t.add_argument("--decay-after", type=int, default=0,
                   help="... at the end of every epoch from this one on")
    t.add_argument("--clip", type=float, default=5.0, help="gradient-norm clipping (0: none; default 5)")
    t.add_argument("--epochs", type=_positive(int), default=1)
    t.add_argument("--max-steps", type=_positive(int), default=300, help="stop after this many steps "
                                                                        "(default 300; --full for none)")
    t.add_argument("--full", dest="max_steps", action="store_const", const=None,
                   help="no step limit: run every epoch")
    t.add_argument("--minutes", type=_positive(float), default=None, help="stop after this much time")
    t.add_argument("--eval-every", type=int, default=100, help="validate every N steps (0: only at the end)")
    t.add_argument("--eval-batch", type=_positive(int), default=16)
    t.add_argument("--sample", type=int, default=300, help="tokens to generate at the end (default 300)")
    t.add_argument("--checkpoint", help="save the run here (.npz) at every validation and at the end")
    t.add_argument("--resume", help="resume exactly from a checkpoint")
    t.add_argument("--plot", help="write the training and validation curves to this PNG (needs matplotlib)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    t.add_argument("--print-every", type=_positive(int), default=20,
                   help="a progress line every N steps when not on a terminal")
    t.set_defaults(run=train)
    commands.add_parser("info", help="what this installation was built with").set_defaults(run=info)
    args = parser.parse_args(argv)
    if args.command == "demo" and not 0 < args.delay < args.window:
        parser.error(f"--delay: expected 0 < delay < window ({args.window}), got {args.delay}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
