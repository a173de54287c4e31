"""One representative window (LSTM, T=256, B=64, I=H=512 by default), forward and backward, for the profilers.

Nsight Systems (timeline with the NVTX ranges conveyor::lstm_forward, conveyor::recurrence, ...):

    nsys profile -t cuda,nvtx,osrt -o conveyor-lstm --force-overwrite true \\
        python bench/profile_window.py --device cuda
    nsys stats --report nvtx_sum,cuda_gpu_kern_sum conveyor-lstm.nsys-rep

Nsight Compute (per-kernel metrics: occupancy, registers, throughput; build with -DCONVEYOR_CUDA_LINEINFO=ON,
e.g. CMAKE_ARGS=-DCONVEYOR_CUDA_LINEINFO=ON pip install ., for source lines):

    ncu --nvtx --nvtx-include "conveyor::lstm_forward/" --nvtx-include "conveyor::lstm_backward/" \\
        -k regex:"forward_step|backward_step|gemm" -c 12 --set full -o conveyor-lstm -f \\
        python bench/profile_window.py --device cuda --repeats 1
    ncu --import conveyor-lstm.ncu-rep --page details --csv > conveyor-lstm-ncu.csv

On the CPU the same NVTX ranges mark the calls (nsys profile -t nvtx,osrt python bench/profile_window.py).
Prints the median time per window.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import conveyor


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--algorithm", choices=("auto", "per_step", "persistent"), default="auto",
                        help="the CUDA backend's recurrence (gpu_check.sh profiles the persistent kernels)")
    args = parser.parse_args()
    T, B, H = args.steps, args.batch, args.hidden
    G = {"lstm": 4, "gru": 3, "rnn": 1}[args.cell]
    rng = np.random.default_rng(0)
    arrays = [rng.uniform(-1, 1, (T, B, H)), rng.uniform(-0.05, 0.05, (G * H, H)),
              rng.uniform(-0.05, 0.05, (G * H, H)), rng.uniform(-0.05, 0.05, G * H),
              rng.uniform(-0.05, 0.05, G * H), rng.uniform(-1, 1, (T, B, H))]
    sync = lambda: None  # noqa: E731
    if args.device == "cuda":
        import torch

        dtype = getattr(torch, args.dtype)
        arrays = [torch.from_numpy(a).to("cuda", dtype) for a in arrays]
        sync = torch.cuda.synchronize
    else:
        arrays = [a.astype(args.dtype) for a in arrays]
    x, W, R, bW, bR, dy = arrays
    forward = getattr(conveyor, f"{args.cell}_forward")
    backward = getattr(conveyor, f"{args.cell}_backward")
    options = {"algorithm": args.algorithm} if args.device == "cuda" else {}
    times = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        sync()
        start = time.perf_counter()
        saved = forward(x, W, R, bW, bR, **options)[-1]
        backward(saved, dy)
        sync()
        times.append(time.perf_counter() - start)
    print(f"{args.cell} T={T} B={B} H={H} {args.dtype} on {args.device}: forward+backward "
          f"{1e3 * statistics.median(times[1:] or times):.2f} ms per window (median of {args.repeats})")


if __name__ == "__main__":
    main()
