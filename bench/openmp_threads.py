"""Conveyor's CPU work on its own pool or on torch's OpenMP threads (conveyor.share_openmp_threads), alone and
right after a torch.nn call, in one process.

    python bench/openmp_threads.py [--threads 2] [--repeats 25] [--point 64 32 256 256]

After each parallel region GNU OpenMP's threads spin on their cores for some milliseconds; a pool of
Conveyor's own started right after shares those cores with them. Prints the median and best ms of
conveyor.torch.LSTM's forward (no_grad) in four settings, taken in turn call after call: {own pool, torch's
threads} x {alone, right after torch.nn.LSTM's forward on the same input}, and torch.nn's own time in the
second case (Conveyor's pool threads can be in its way too). Then calls after idle time: 15 forwards 50 ms
apart for torch.nn and for Conveyor on each runtime, every time printed (a sleeping thread of the runtime
can take milliseconds to join a parallel region)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import conveyor
import conveyor.torch as ct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--point", type=int, nargs=4, default=[64, 32, 256, 256],
                        metavar=("T", "B", "I", "H"))
    args = parser.parse_args()
    T, B, I, H = args.point
    torch.set_num_threads(args.threads)
    conveyor.set_num_threads(args.threads)
    if not conveyor.share_openmp_threads(True):
        raise SystemExit("this PyTorch build loads no GNU OpenMP runtime: nothing to compare")
    torch.manual_seed(0)
    ours, theirs = ct.LSTM(I, H).eval(), torch.nn.LSTM(I, H).eval()
    x = torch.randn(T, B, I)

    def timed(module):
        with torch.no_grad():
            start = time.perf_counter()
            module(x)
            return time.perf_counter() - start

    settings = [(share, after) for share in (False, True) for after in (False, True)]
    ours_ms = {s: [] for s in settings}
    torch_ms = {s: [] for s in settings if s[1]}
    for _ in range(2 + args.repeats):
        for share, after in settings:
            conveyor.share_openmp_threads(share)
            if after:
                torch_ms[(share, after)].append(timed(theirs))
            else:
                time.sleep(0.05)  # torch's threads from the previous setting stop spinning
            ours_ms[(share, after)].append(timed(ours))
    print(f"LSTM T={T}, B={B}, I={I}, H={H}, forward (no_grad), {args.threads} threads, {args.repeats} "
          f"rounds (torch {torch.__version__}); ms, median / best")
    print("| Conveyor's threads | when | Conveyor | torch.nn just before |")
    print("| --- | --- | --- | --- |")
    for share, after in settings:
        name = "torch's OpenMP threads" if share else "own pool"
        when = "right after a torch.nn call" if after else "alone"
        mine = ours_ms[(share, after)][2:]
        cell = f"{statistics.median(mine) * 1e3:.2f} / {min(mine) * 1e3:.2f}"
        before = ""
        if after:
            theirs_times = torch_ms[(share, after)][2:]
            before = f"{statistics.median(theirs_times) * 1e3:.2f} / {min(theirs_times) * 1e3:.2f}"
        print(f"| {name} | {when} | {cell} | {before} |")

    print("\nForwards 50 ms apart, ms, in order:")
    for name, module, share in [("torch.nn", theirs, None), ("Conveyor, own pool", ours, False),
                                ("Conveyor, torch's threads", ours, True)]:
        if share is not None:
            conveyor.share_openmp_threads(share)
        times = []
        for _ in range(15):
            time.sleep(0.05)
            times.append(timed(module) * 1e3)
        print(f"- {name}: " + " ".join(f"{t:.2f}" for t in times))


if __name__ == "__main__":
    main()
