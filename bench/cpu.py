"""Conveyor on the CPU beside torch.nn (oneDNN's fused LSTM; torch's own GRU), measured in one run.

    python bench/cpu.py [--threads 1 2] [--repeats 15] [--quick] [--out FILE.md]

Every point runs conveyor.torch and torch.nn with the same weights on the same input, interleaved (one
Conveyor repetition, one torch repetition, and so on), and reports medians: forward (torch.no_grad, eval
mode: the inference path) and forward+backward (training mode, the gradient of sum(y) into every weight),
float32, with 1 and 2 threads each (torch.set_num_threads and conveyor.set_num_threads). The ratio is torch
time / Conveyor time: above 1, Conveyor is faster. The floor is the point's multiply-add flops at the peak
that NumPy's BLAS reaches here on a large float32 product (the best float32 multiply-add GEMM on this
machine, measured on all cores and scaled to the thread count), printed beside each measurement; where the
processor has AMX, Conveyor's float32 products run on its tiles (conveyor.use_amx) and can beat it. Last,
the overhead of one tiny call (T=1, B=1, H=8) through conveyor.torch, the functional API and torch.nn."""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

import conveyor

try:
    import torch

    import conveyor.torch as ct
except ImportError:
    sys.exit("bench/cpu.py compares with torch.nn: pip install torch")

# (cell, T, B, I, H, layers), the points of the CPU-speed issue plus a 2-layer stack.
POINTS = [("lstm", 64, 32, 256, 256, 1), ("lstm", 64, 64, 1024, 1024, 1), ("lstm", 35, 20, 100, 100, 1),
          ("lstm", 200, 8, 88, 36, 1), ("lstm", 100, 1, 64, 64, 1), ("gru", 64, 32, 256, 256, 1),
          ("gru", 200, 8, 88, 46, 1), ("lstm", 64, 32, 256, 256, 2)]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def flops(cell, T, B, I, H, layers, backward):
    """Multiply-add flops (2 per multiply-add) of the products: forward x W^T and h R^T; backward adds dx,
    dW, dR and dh R, twice the forward's."""
    g = GATES[cell]
    forward = sum(2 * T * B * g * H * ((I if layer == 0 else H) + H) for layer in range(layers))
    return forward * (3 if backward else 1)


def blas_peak(threads: int) -> float:
    """Flop/s of NumPy's float32 matmul on 1024^3 with ``threads`` threads: measured on every core of the
    machine and scaled by threads / cores (NumPy's BLAS takes its thread count at import)."""
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    for _ in range(3):
        a @ a
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * 1024**3 / min(times) * threads / (os.cpu_count() or 1)


def interleaved(functions, repeats, calls=1):
    """Median seconds per call of each function, run in turn repeat after repeat (after two warm-up rounds),
    `calls` times in a row each turn: 1 measures a call after the others' (their work in the caches), more a
    call in a loop of its own (its caches warm, as over a stream's steps)."""
    for _ in range(2):
        for fn in functions:
            fn()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for i, fn in enumerate(functions):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[i].append((time.perf_counter() - start) / calls)
    return [statistics.median(t) for t in times]


def modules(cell, I, H, layers):
    reference = getattr(torch.nn, cell.upper())(I, H, num_layers=layers)
    ours = getattr(ct, cell.upper())(I, H, num_layers=layers)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def measure_point(point, repeats):
    cell, T, B, I, H, layers = point
    torch.manual_seed(0)
    ours, reference = modules(cell, I, H, layers)
    x = torch.randn(T, B, I)
    x_grad = x.clone().requires_grad_(True)

    def forward(module):
        def run():
            module.eval()
            with torch.no_grad():
                module(x)
        return run

    def forward_backward(module):
        def run():
            module.train()
            module.zero_grad(set_to_none=True)
            x_grad.grad = None
            module(x_grad)[0].sum().backward()
        return run

    f_ours, f_torch = interleaved([forward(ours), forward(reference)], repeats)
    fb_ours, fb_torch = interleaved([forward_backward(ours), forward_backward(reference)], repeats)
    return f_ours, f_torch, fb_ours, fb_torch


def call_overhead(repeats):
    torch.manual_seed(0)
    ours, reference = modules("lstm", 8, 8, 1)
    x = torch.randn(1, 1, 8)
    xg = x.clone().requires_grad_(True)
    p = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    xn = x.numpy()

    def functional():
        conveyor.lstm_forward(xn, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"],
                              training=False)

    def no_grad(module):
        def run():
            with torch.no_grad():
                module(x)
        return run

    def with_grad(module):
        def run():
            module(xg)[0].sum().backward()
        return run

    runs = [functional, no_grad(ours), no_grad(reference), with_grad(ours), with_grad(reference)]
    alternating = interleaved(runs, repeats * 20)
    in_a_row = interleaved(runs, repeats, calls=200)
    return [t * 1e6 for t in alternating], [t * 1e6 for t in in_a_row]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="the first three points only, 5 repeats")
    parser.add_argument("--out", help="also write the Markdown tables here")
    args = parser.parse_args()
    points = POINTS[:3] if args.quick else POINTS
    repeats = 5 if args.quick else args.repeats
    machine = platform.processor() or platform.machine()
    try:  # the model name says more than the architecture (results from two machines sit side by side)
        with open("/proc/cpuinfo") as cpuinfo:
            machine = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    products = "AMX tiles" if conveyor.using_amx() else "AVX/FMA units"
    lines = [f"Conveyor {conveyor.__version__} beside torch {torch.__version__} on {machine} "
             f"({os.cpu_count()} cores), float32 (Conveyor's products on {products}); "
             f"`python bench/cpu.py {' '.join(sys.argv[1:])}`", ""]

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    print("\n".join(lines), flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        conveyor.set_num_threads(threads)
        peak = blas_peak(threads)
        emit(f"### {threads} thread(s); BLAS peak {peak / 1e9:.0f} GFLOP/s (the floors below)")
        emit()
        emit("| cell | T, B, I, H | layers | forward ms: Conveyor / torch / floor | ratio "
             "| forward+backward ms: Conveyor / torch / floor | ratio |")
        emit("| --- | --- | ---: | --- | ---: | --- | ---: |")
        ratios_f, ratios_fb = [], []
        for point in points:
            cell, T, B, I, H, layers = point
            f_ours, f_torch, fb_ours, fb_torch = measure_point(point, repeats)
            floor_f = flops(*point, backward=False) / peak
            floor_fb = flops(*point, backward=True) / peak
            ratios_f.append(f_torch / f_ours)
            ratios_fb.append(fb_torch / fb_ours)
            emit(f"| {cell} | {T}, {B}, {I}, {H} | {layers} | {f_ours * 1e3:.2f} / {f_torch * 1e3:.2f} / "
                 f"{floor_f * 1e3:.2f} | {ratios_f[-1]:.2f} | {fb_ours * 1e3:.2f} / {fb_torch * 1e3:.2f} / "
                 f"{floor_fb * 1e3:.2f} | {ratios_fb[-1]:.2f} |")

        def geomean(values):
            return math.exp(sum(math.log(v) for v in values) / len(values))

        emit(f"| geometric mean | | | | **{geomean(ratios_f):.2f}** | | **{geomean(ratios_fb):.2f}** |")
        emit()
        for how, (functional, ours_f, torch_f, ours_fb, torch_fb) in zip(
                ("each call after the others' (cold)", "200 calls in a row (warm)"), call_overhead(repeats)):
            emit(f"Call overhead, LSTM T=1, B=1, I=H=8 (µs), {how}: functional API {functional:.1f}; "
                 f"conveyor.torch {ours_f:.1f} forward (no_grad), {ours_fb:.1f} forward+backward; torch.nn "
                 f"{torch_f:.1f} and {torch_fb:.1f}")
            emit()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
