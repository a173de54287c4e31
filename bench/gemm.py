"""The CUDA backend's time-parallel products (cuda/gemm.cu) against cuBLAS on the same GPU, in one run.

The products a window forms outside its recurrence, at the sizes of T steps of B rows for an LSTM with
I = H (tokens N = T B): the input projection x W^T [N, 4H] (storage type in, compute type out), and the
gradients dx = da W [N, I], dW = da^T x [4H, I] and dR = da^T h [4H, H] (a compute-type da times a
storage-type operand, out in the storage type). Each is timed through conveyor._conveyor._gemm and, on the
same shapes and layouts, as torch.matmul (cuBLAS) in the storage type; the measured dense peak of a dtype is
cuBLAS's rate on a square product of --peak-size, timed in the same run. The speed issue's target: each
product at least 60% of its dtype's peak. float32 rows run on the SIMT kernel, float32 with --tf32 and the
16-bit types on tensor cores.

Times are medians of CUDA-event timings after warm-up (bench/cuda_rnn.py's median_ms). Rows are printed and
written to --out as they are measured. Exits with a message, not a traceback, without a GPU.

    python bench/gemm.py --dtype float32,bfloat16 --tf32 --out bench/results/gemm-h100.md
"""

from __future__ import annotations

import argparse
import platform
import sys

import cuda_rnn

import conveyor
from conveyor import _conveyor


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", type=cuda_rnn.comma_list(str, ("float32", "float16", "bfloat16")),
                        default=["float32", "bfloat16"])
    parser.add_argument("--tf32", action="store_true", help="float32 rows in TF32 too (both sides)")
    parser.add_argument("--tokens", type=int, default=256 * 64, help="N = T B, rows of the window")
    parser.add_argument("--hidden", type=cuda_rnn.comma_list(int), default=[1024], help="H (= I)")
    parser.add_argument("--peak-size", type=int, default=8192, help="size of the square product for the peak")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-ms", type=float, default=500.0)
    parser.add_argument("--out", help="also write the table to this Markdown file, row by row")
    return parser.parse_args(argv)


# (name, kind, M, N, K, A stored transposed, B stored transposed) for tokens N and hidden H, LSTM, I = H.
def products(tokens, H):
    G = 4 * H
    return [
        ("x W^T", "projection", tokens, G, H, False, True),
        ("dx = da W", "gradient", tokens, H, G, False, False),
        ("dW = da^T x", "gradient", G, H, tokens, True, False),
        ("dR = da^T h", "gradient", G, H, tokens, True, False),
    ]


def peak_tflops(torch, timing, storage, n):
    """cuBLAS's rate on a square product of size n in `storage`, TFLOP/s."""
    a, b = (torch.rand(n, n, device="cuda", dtype=storage) for _ in range(2))
    return 2 * n ** 3 / timing(lambda: torch.matmul(a, b)) / 1e9


def product_ms(torch, timing, dtype, tf32, kind, M, N, K, a_transposed, b_transposed):
    """(Conveyor's ms, cuBLAS's ms) for one product, on operands laid out as the backend's."""
    storage = getattr(torch, dtype)
    a_type = storage if kind == "projection" else torch.float32
    c_type = torch.float32 if kind == "projection" else storage
    a = torch.rand((K, M) if a_transposed else (M, K), device="cuda", dtype=a_type)
    b = torch.rand((N, K) if b_transposed else (K, N), device="cuda", dtype=storage)
    c = torch.empty(M, N, device="cuda", dtype=c_type)
    stream = torch.cuda.current_stream().cuda_stream

    def ours():
        _conveyor._gemm(kind, dtype, M, N, K, a.data_ptr(), b.data_ptr(), c.data_ptr(),
                        a_transposed=a_transposed, b_transposed=b_transposed, allow_tf32=tf32, stream=stream)

    a_op = (a.t() if a_transposed else a).to(storage)  # cuBLAS multiplies in one type
    b_op = b.t() if b_transposed else b
    return timing(ours), timing(lambda: torch.matmul(a_op, b_op))


def main(argv=None):
    args = parse_args(argv)
    torch = cuda_rnn.check_gpu("bench/gemm.py")
    props = torch.cuda.get_device_properties(0)
    table = cuda_rnn.Table(args.out)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    table.add(
        "# Conveyor's time-parallel products (cuda/gemm.cu) vs cuBLAS (torch.matmul)",
        "",
        f"- device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
        f"conveyor {conveyor.__version__}; Python {platform.python_version()}",
        f"- tokens N = T B = {args.tokens}; median of up to {args.repeats} CUDA-event timings after warm-up",
        f"- command: python bench/gemm.py {command}",
        "- peak: cuBLAS on a square product of that size, in that dtype, in this run",
        "",
        "| product | dtype | M, N, K | Conveyor ms | Conveyor TFLOP/s | cuBLAS ms | cuBLAS TFLOP/s | "
        "Conveyor / cuBLAS time | Conveyor / peak |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    )

    def timing(fn):
        return cuda_rnn.median_ms(torch, lambda _: fn(), [None], args.repeats, args.warmup, args.budget_ms)

    cases = [(dtype, False) for dtype in args.dtype]
    if args.tf32 and "float32" in args.dtype:
        cases.insert(args.dtype.index("float32") + 1, ("float32", True))
    failures = 0
    for dtype, tf32 in cases:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        label, n = f"{dtype}{' (TF32)' if tf32 else ''}", args.peak_size
        peak = peak_tflops(torch, timing, getattr(torch, dtype), n)
        table.add(f"| peak {n}^3 | {label} | {n}, {n}, {n} | - | - | - | {peak:.1f} | - | - |")
        for H in args.hidden:
            for name, kind, M, N, K, a_transposed, b_transposed in products(args.tokens, H):
                row = f"| {name} (H={H}) | {label} | {M}, {N}, {K} |"
                try:
                    ms, theirs_ms = product_ms(torch, timing, dtype, tf32, kind, M, N, K, a_transposed,
                                               b_transposed)
                except Exception as error:  # the row says what failed; the rest still counts
                    failures += 1
                    table.add(f"{row} error: {cuda_rnn.describe(error)} | - | - | - | - | - |")
                    continue
                rate, theirs = 2 * M * N * K / ms / 1e9, 2 * M * N * K / theirs_ms / 1e9
                table.add(f"{row} {ms:.3f} | {rate:.1f} | {theirs_ms:.3f} | {theirs:.1f} | "
                          f"{ms / theirs_ms:.2f} | {rate / peak:.2f} |")
    if failures:
        table.add("", f"{failures} measurement(s) failed: see the rows marked error")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
