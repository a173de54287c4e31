"""The speed benchmark of issue 7, in one run on one GPU: Conveyor, torch.nn.LSTM/GRU (cuDNN) and FlashRNN
(the ``flashrnn`` package, skipped with a note when it is not installed or cannot run), on the same sizes.

For each cell (LSTM, GRU), T in {256, 1024}, B in {1, 8, 16, 64, 256}, H in {256, 512, 768, 1024} (input size
= H) and dtype (float32, bfloat16): forward and forward+backward time per window, timed with CUDA events, the
median of --repeats runs after warm-up, over rotating inputs (bench/cuda_rnn.py measures Conveyor and cuDNN).
FlashRNN's interface takes the input projection W x precomputed, so its times leave that product out, while
Conveyor's and cuDNN's include it: the table says so. Prints a Markdown table with the ratios Conveyor /
cuDNN and Conveyor / FlashRNN (below 1: Conveyor is faster), writes it to --out, and plots the ratios to
--plot (matplotlib).

    python bench/speed.py --out bench/results/speed-h100.md --plot bench/results/speed-h100.png
"""

from __future__ import annotations

import argparse
import sys
import types

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
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("bench/speed.py needs PyTorch with CUDA")
    if not torch.cuda.is_available() or not conveyor.cuda_available():
        sys.exit("bench/speed.py needs a CUDA GPU, PyTorch with CUDA and Conveyor's CUDA backend")
    lines = [f"# Speed: Conveyor vs cuDNN vs FlashRNN on {torch.cuda.get_device_name()}", "",
             f"- torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
             f"conveyor {conveyor.__version__}",
             f"- command: python bench/speed.py {' '.join(sys.argv[1:] if argv is None else argv)}",
             "- ms per window (median, CUDA events); ratios below 1: Conveyor is faster. FlashRNN's times "
             "leave out the input projection, which its interface takes precomputed.", "",
             "| cell | dtype | T | B | H | fwd Conveyor | fwd cuDNN | fwd ratio | f+b Conveyor | f+b cuDNN "
             "| f+b ratio | f+b FlashRNN | Conveyor/FlashRNN |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    rows, notes = [], set()
    for cell in args.cells.split(","):
        for dtype in args.dtypes.split(","):
            for T in (int(t) for t in args.steps.split(",")):
                for H in (int(h) for h in args.hidden.split(",")):
                    for B in (int(b) for b in args.batch.split(",")):
                        config = types.SimpleNamespace(cell=cell, dtype=dtype, steps=T, tf32=False,
                                                       repeats=args.repeats, warmup=args.warmup)
                        m = cuda_rnn.measure(torch, config, B, H)
                        flash, why = flashrnn_times(torch, cell, T, B, H, getattr(torch, dtype),
                                                    args.repeats, args.warmup)
                        if why:
                            notes.add(why)
                        f_text = "-" if flash is None else f"{flash[1]:.3f}"
                        f_ratio = "-" if flash is None else f"{m['conveyor_training'] / flash[1]:.2f}"
                        fwd = m["conveyor_forward"] / m["cudnn_forward"]
                        both = m["conveyor_training"] / m["cudnn_training"]
                        row = (f"| {cell} | {dtype} | {T} | {B} | {H} | {m['conveyor_forward']:.3f} | "
                               f"{m['cudnn_forward']:.3f} | {fwd:.2f} | {m['conveyor_training']:.3f} | "
                               f"{m['cudnn_training']:.3f} | {both:.2f} | {f_text} | {f_ratio} |")
                        print(row, flush=True)
                        lines.append(row)
                        rows.append((cell, dtype, T, B, H, both))
    for note in sorted(notes):
        lines.append(f"\nFlashRNN: {note}")
        print(f"FlashRNN: {note}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.plot:
        plot(rows, args.plot, torch.cuda.get_device_name())
    return 0


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
            points = sorted((r[3], r[5]) for r in rows if r[:3] == (cell, dtype, T) and r[4] == H)
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"H={H}")
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
