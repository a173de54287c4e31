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
    print(f"CUDA backend built: {_conveyor.cuda_built()}")
    print(f"CUDA available:     {_conveyor.cuda_available()} ({_conveyor.cuda_device_count()} device(s))")
    print(f"CPU threads:        {_conveyor.num_threads()}")
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
    commands.add_parser("info", help="what this installation was built with").set_defaults(run=info)
    args = parser.parse_args(argv)
    if args.command == "demo" and not 0 < args.delay < args.window:
        parser.error(f"--delay: expected 0 < delay < window ({args.window}), got {args.delay}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
