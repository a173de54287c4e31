"""Conveyor's CUDA backend next to torch.nn.LSTM / torch.nn.GRU (cuDNN) on the same GPU, in one run.

Times one window of T steps, forward (inference) and forward + backward (training, with dx and every
parameter gradient), at each batch size B and hidden size H (input size = H), with CUDA events around each
call, after warm-up, as the median of --repeats runs over rotating inputs. Prints a Markdown table of the
times and of the ratios Conveyor / cuDNN (below 1: Conveyor is faster), and writes it to --out.

TF32 is off on both sides unless --tf32 (torch.backends.cudnn.allow_tf32 and Conveyor's allow_tf32).

    python bench/cuda_rnn.py --cell lstm --out bench/results/cuda-lstm-h100.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import conveyor


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    parser.add_argument("--steps", type=int, default=256, help="T, steps per window")
    parser.add_argument("--batch", default="1,16,64,256", help="batch sizes B, comma-separated")
    parser.add_argument("--hidden", default="256,1024", help="hidden sizes H (= input size), comma-separated")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 on both sides")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="also write the table to this Markdown file")
    return parser.parse_args(argv)


def median_ms(torch, fn, inputs, repeats, warmup):
    for k in range(warmup):
        fn(inputs[k % len(inputs)])
    times = []
    for k in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[k % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(torch, args, B, H):
    dtype = getattr(torch, args.dtype)
    T, G = args.steps, {"lstm": 4, "gru": 3}[args.cell]
    module = (torch.nn.LSTM if args.cell == "lstm" else torch.nn.GRU)(H, H).to("cuda", dtype)
    W, R = module.weight_ih_l0.detach(), module.weight_hh_l0.detach()
    bW, bR = module.bias_ih_l0.detach(), module.bias_hh_l0.detach()
    assert W.shape == (G * H, H)
    inputs = [torch.randn(T, B, H, device="cuda", dtype=dtype) for _ in range(3)]
    h0 = torch.zeros(1, B, H, device="cuda", dtype=dtype)
    dy = torch.randn(T, B, H, device="cuda", dtype=dtype)
    forward = getattr(conveyor, f"{args.cell}_forward")
    backward = getattr(conveyor, f"{args.cell}_backward")
    state = (h0, h0) if args.cell == "lstm" else h0

    def conveyor_forward(x):
        forward(x, W, R, bW, bR, training=False, allow_tf32=args.tf32)

    def conveyor_training(x):
        saved = forward(x, W, R, bW, bR, allow_tf32=args.tf32)[-1]
        backward(saved, dy)

    def cudnn_forward(x):
        with torch.no_grad():
            module(x, state)

    def cudnn_training(x):
        module.zero_grad(set_to_none=True)  # write the gradients, as Conveyor does, rather than add to them
        x.requires_grad_(True)
        y, _ = module(x, state)
        torch.autograd.backward(y, dy)
        x.requires_grad_(False)
        x.grad = None

    r, w = args.repeats, args.warmup
    return {
        "conveyor_forward": median_ms(torch, conveyor_forward, inputs, r, w),
        "cudnn_forward": median_ms(torch, cudnn_forward, inputs, r, w),
        "conveyor_training": median_ms(torch, conveyor_training, inputs, r, w),
        "cudnn_training": median_ms(torch, cudnn_training, inputs, r, w),
    }


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("bench/cuda_rnn.py needs PyTorch with CUDA (pip install torch)")
    if not torch.cuda.is_available() or not conveyor.cuda_available():
        sys.exit("bench/cuda_rnn.py needs a CUDA GPU, PyTorch with CUDA and Conveyor's CUDA backend")
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    batches = [int(b) for b in args.batch.split(",")]
    hiddens = [int(h) for h in args.hidden.split(",")]

    lines = [
        f"# Conveyor CUDA {args.cell.upper()} vs torch.nn.{args.cell.upper()} (cuDNN)",
        "",
        f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}, "
        f"cuDNN {torch.backends.cudnn.version()}; conveyor {conveyor.__version__}; "
        f"Python {platform.python_version()}",
        f"- T={args.steps}, input size = H, {args.dtype}, TF32 {'on' if args.tf32 else 'off'}; median of "
        f"{args.repeats} runs after {args.warmup} warm-up, CUDA events, rotating inputs",
        f"- command: python bench/cuda_rnn.py {' '.join(sys.argv[1:] if argv is None else argv)}",
        "- ratio = Conveyor / cuDNN (below 1: Conveyor is faster)",
        "",
        "| B | H | forward Conveyor (ms) | forward cuDNN (ms) | ratio "
        "| fwd+bwd Conveyor (ms) | fwd+bwd cuDNN (ms) | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for H in hiddens:
        for B in batches:
            m = measure(torch, args, B, H)
            row = (f"| {B} | {H} | {m['conveyor_forward']:.3f} | {m['cudnn_forward']:.3f} | "
                   f"{m['conveyor_forward'] / m['cudnn_forward']:.2f} | {m['conveyor_training']:.3f} | "
                   f"{m['cudnn_training']:.3f} | {m['conveyor_training'] / m['cudnn_training']:.2f} |")
            print(row, flush=True)
            lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
