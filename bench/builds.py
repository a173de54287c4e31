"""Conveyor alone at cpu.py's points, for comparing two builds of it on a noisy machine.

    PYTHONPATH=<build A> python bench/builds.py --threads 2 --repeats 11 small ptb gru
    PYTHONPATH=<build B> python bench/builds.py --threads 2 --repeats 11 small ptb gru
    (alternated, a few rounds of each)

Prints the best of `repeats` calls in ms, forward (no_grad, eval mode) / forward+backward (training mode, the
gradient of sum(y)), float32, through conveyor.torch. Where other programs move a run's median by 10-30%,
the best of each process, and the best over rounds of processes alternated build by build, is what two
builds can be compared by; cpu.py measures against torch.nn in one run."""

from __future__ import annotations

import argparse
import time

import torch

import conveyor
import conveyor.torch as ct

POINTS = {"small": ("LSTM", 64, 32, 256, 256), "large": ("LSTM", 64, 64, 1024, 1024),
          "ptb": ("LSTM", 35, 20, 100, 100), "jsb": ("LSTM", 200, 8, 88, 36),
          "stream": ("LSTM", 100, 1, 64, 64), "gru": ("GRU", 64, 32, 256, 256)}


def best_ms(fn, repeats):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def measure(name, repeats):
    """The point's best forward and forward+backward times in ms."""
    cell, T, B, I, H = POINTS[name]
    torch.manual_seed(0)
    layer = getattr(ct, cell)(I, H)
    x = torch.randn(T, B, I)
    x_grad = x.clone().requires_grad_(True)

    def forward():
        layer.eval()
        with torch.no_grad():
            layer(x)

    def forward_backward():
        layer.train()
        layer.zero_grad(set_to_none=True)
        x_grad.grad = None
        layer(x_grad)[0].sum().backward()

    return best_ms(forward, repeats), best_ms(forward_backward, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("points", nargs="+", choices=sorted(POINTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    conveyor.set_num_threads(args.threads)
    torch.set_num_threads(1)
    results = []
    for name in args.points:
        f, fb = measure(name, args.repeats)
        results.append(f"{name} {f:.3f}/{fb:.3f}")
    print(" ".join(results))


if __name__ == "__main__":
    main()
