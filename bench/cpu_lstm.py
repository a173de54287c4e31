"""CPU time of one LSTM window, forward and forward+backward, float32, Conveyor next to torch.nn.LSTM.

    python bench/cpu_lstm.py [--steps 64 --batch 32 --input 256 --hidden 256 --repeats 20]

Both run on all cores of this machine (Conveyor's pool, torch's intra-op threads); the median of --repeats
timed runs after warm-up is reported, with the ratio torch / Conveyor (above 1: Conveyor is faster).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import conveyor


def median_seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    T, B, I, H = args.steps, args.batch, args.input, args.hidden
    rng = np.random.default_rng(0)
    layer = conveyor.LSTM(I, H, seed=0)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)

    def conveyor_forward():
        layer.eval()(x)

    def conveyor_forward_backward():
        layer.train()(x)
        layer.backward(dy)

    rows = [("conveyor", median_seconds(conveyor_forward, args.repeats),
             median_seconds(conveyor_forward_backward, args.repeats))]
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        model = torch.nn.LSTM(I, H)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
        tx = torch.from_numpy(x)
        tdy = torch.from_numpy(dy)

        def torch_forward():
            with torch.no_grad():
                model(tx)

        def torch_forward_backward():
            txg = tx.clone().requires_grad_(True)
            y, _ = model(txg)
            y.backward(tdy)

        rows.append((f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
                     median_seconds(torch_forward, args.repeats),
                     median_seconds(torch_forward_backward, args.repeats)))
    print(f"LSTM T={T} B={B} I={I} H={H} float32 on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; conveyor {conveyor.__version__} with {conveyor.num_threads()} threads")
    print(f"{'':40s} {'forward ms':>12s} {'fwd+bwd ms':>12s}")
    for name, fwd, fwd_bwd in rows:
        print(f"{name:40s} {fwd * 1e3:12.2f} {fwd_bwd * 1e3:12.2f}")
    if len(rows) > 1:
        (_, cf, cb), (_, tf, tb) = rows
        print(f"{'ratio torch / conveyor':40s} {tf / cf:12.2f} {tb / cb:12.2f}")


if __name__ == "__main__":
    main()
