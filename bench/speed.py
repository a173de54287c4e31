"""The speed benchmark of issue 7, in one run on one GPU: Conveyor, torch.nn.LSTM/GRU (cuDNN) and FlashRNN
(the ``flashrnn`` package, skipped with a note when it is not installed or cannot run), on the same sizes, for
each of Conveyor's algorithms asked for (--algorithm: per_step, persistent, auto, or a list; rows name it).

For each cell (LSTM, GRU), T in {256, 1024}, B in {1, 8, 16, 64, 256}, H in {256, 512, 768, 1024} (input size
= H) and dtype (float32, bfloat16): forward and forward+backward time per window, timed with CUDA events, the
median of --repeats runs after warm-up, over rotating inputs (bench/cuda_rnn.py measures Conveyor and cuDNN).
FlashRNN's interface takes the input projection W x precomputed, so its times leave that product out, while
Conveyor's and cuDNN's include it: the table says so. Prints a Markdown table with the ratios Conveyor /
cuDNN and Conveyor / FlashRNN (below 1: Conveyor is faster), writes it to --out row by row (flushed), and
plots the ratios to --plot (matplotlib). Where the persistent kernel does not fit, a note at the end says why.

    python bench/speed.py --out bench/results/speed-h100.md --plot bench/results/speed-h100.png
"""

from __future__ import annotations

import argparse
import itertools
import sys

import cuda_rnn

import conveyor


def flashrnn_times(torch, cell, T, B, H, dtype, repeats, warmup):
    """(forward ms, forward+backward ms) of FlashRNN's fused CUDA kernel, or (None, why)."""
    try:
        from flashrnn import flashrnn
    except ImportError:
        return None, "flashrnn is not installed (pip install flashrnn)"
    G = {"lstm": 4, "gru": 3}[cell]
    try:
        Wx = [torch.randn(B, T, G, 1, H, device="cuda", dtype=dtype) for _ in range(3)]
        R = (torch.randn(G, 1, H, H, device="cuda", dtype=dtype) * H**-0.5).requires_grad_(True)
        b = torch.zeros(G, 1, H, device="cuda", dtype=dtype, requires_grad=True)
        name = str(dtype).split(".")[-1]

        def forward(wx):
            with torch.no_grad():
                flashrnn(wx, R, b, function=cell, backend="cuda_fused", dtype=name)

        def training(wx):
            wx.requires_grad_(True)
            out = flashrnn(wx, R, b, function=cell, backend="cuda_fused", dtype=name)[0]
            out.sum().backward()
            wx.requires_grad_(False)
            wx.grad = R.grad = b.grad = None

        return (cuda_rnn.median_ms(torch, forward, Wx, repeats, warmup),
                cuda_rnn.median_ms(torch, training, Wx, repeats, warmup)), None
    except Exception as error:  # its kernels are JIT-compiled and size-limited: report, do not stop
        return None, f"flashrnn failed: {type(error).__name__}: {str(error)[:120]}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="lstm,gru")
    parser.add_argument("--steps", default="256,1024")
    parser.add_argument("--batch", default="1,8,16,64,256")
    parser.add_argument("--hidden", default="256,512,768,1024")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--algorithm", type=cuda_rnn.comma_list(str, cuda_rnn.ALGORITHMS), default=["auto"],
                        help="Conveyor's algorithms (per_step, persistent, auto), each in rows of its own")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-ms", type=float, default=1500.0,
                        help="stop timing a measurement after this many ms of runs (at least 3 runs)")
    parser.add_argument("--out")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    torch = cuda_rnn.check_gpu("bench/speed.py")
    table = cuda_rnn.Table(args.out)
    table.add(f"# Speed: Conveyor vs cuDNN vs FlashRNN on {torch.cuda.get_device_name()}", "",
              f"- torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
              f"conveyor {conveyor.__version__}",
              f"- command: python bench/speed.py {' '.join(sys.argv[1:] if argv is None else argv)}",
              "- ms per window (median, CUDA events); ratios below 1: Conveyor is faster. FlashRNN's times "
              "leave out the input projection, which its interface takes precomputed.", "",
              "| cell | dtype | algorithm | T | B | H | fwd Conveyor | fwd cuDNN | fwd ratio | f+b Conveyor "
              "| f+b cuDNN | f+b ratio | f+b FlashRNN | Conveyor/FlashRNN |",
              "| --- | --- | --- |" + " ---: |" * 11)
    rows, notes = [], set()

    def timing(fn, inputs):
        return cuda_rnn.median_ms(torch, fn, inputs, args.repeats, args.warmup, args.budget_ms)

    grid = itertools.product(args.cells.split(","), args.dtypes.split(","), _ints(args.steps),
                             _ints(args.hidden), _ints(args.batch))
    for cell, dtype, T, H, B in grid:
        problem = cuda_rnn.Problem(torch, cell, dtype, T, B, H)
        cudnn = cuda_rnn.cudnn_times(problem, timing)
        flash, why = flashrnn_times(torch, cell, T, B, H, getattr(torch, dtype), args.repeats, args.warmup)
        if why:
            notes.add(why)
        for algorithm in args.algorithm:
            fwd, both = cuda_rnn.conveyor_times(problem, algorithm, False, timing)
            for what, reason in (("fwd", fwd), ("f+b", both)):
                if isinstance(reason, str):
                    notes.add(f"{cell} {dtype} T={T} B={B} H={H} {algorithm} {what}: {reason}")
            table.add(f"| {cell} | {dtype} | {algorithm} | {T} | {B} | {H} | {cuda_rnn.ms(fwd)} | "
                      f"{cuda_rnn.ms(cudnn[0])} | {cuda_rnn.ratio(fwd, cudnn[0])} | {cuda_rnn.ms(both)} | "
                      f"{cuda_rnn.ms(cudnn[1])} | {cuda_rnn.ratio(both, cudnn[1])} | "
                      f"{'-' if flash is None else cuda_rnn.ms(flash[1])} | "
                      f"{'-' if flash is None else cuda_rnn.ratio(both, flash[1])} |")
            if isinstance(both, float):
                rows.append((cell, dtype, T, B, H, both / cudnn[1], algorithm))
        del problem
    for note in sorted(notes):
        table.add("", f"Note: {note}")
    if args.plot:
        plot(rows, args.plot, torch.cuda.get_device_name())
    return 0


def _ints(text):
    return [int(item) for item in text.split(",")]


def plot(rows, path, device):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; the table has every number")
        return
    groups = sorted({(r[0], r[1], r[2]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
    for ax, (cell, dtype, T) in zip(axes[0], groups):
        for H in sorted({r[4] for r in rows}):
            for algorithm, style in zip(sorted({r[6] for r in rows}), ("o-", "s--", "^:")):
                points = sorted((r[3], r[5]) for r in rows
                                if r[:3] == (cell, dtype, T) and r[4] == H and r[6] == algorithm)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], style, label=f"H={H} {algorithm}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{cell} {dtype} T={T}")
        ax.set_xlabel("batch")
    axes[0][0].set_ylabel("fwd+bwd time / cuDNN's")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(device)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
