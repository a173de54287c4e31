"""Conveyor's CUDA backend next to torch.nn.LSTM / torch.nn.GRU (cuDNN) on the same GPU, in one run, with the
floor of the persistent kernels.

For each hidden size H (input size = H), batch size B, cell and dtype: one window of T steps, forward
(inference) and forward + backward (training, with dx and every parameter gradient), for cuDNN and for each
Conveyor algorithm asked for (--algorithm: per_step, persistent, auto, or a comma-separated list). Each time
is the median of --repeats runs timed with CUDA events around the call, after warm-up, over rotating inputs;
a measurement stops early (after at least 3 runs) once its runs add up to --budget-ms, so that the slow
corners of the grid cannot eat a lent machine's minutes.

The floor (conveyor._conveyor._persistent_floor, cuda/floor.cu) is the persistent kernels' loop with their
grid synchronisation and broadcast of h (forward) or of the gate gradients (backward) and no arithmetic, with
as many blocks as the persistent kernel would use; it is timed the same way. Each Conveyor row gives its time
per step and that as a multiple of the floor: forward over the forward floor, forward + backward over the
forward and backward floors together. Where the persistent kernel does not fit the device, its row says why.

Every row is printed and appended to --out (flushed) as soon as it is measured, so a run cut short keeps
what it did. TF32 is off on both sides unless --tf32. Exits 1 when a measurement failed (a row says which),
and with a message, not a traceback, when there is no GPU, no PyTorch with CUDA or no CUDA backend.

    python bench/cuda_rnn.py --cell lstm,gru --dtype float32,bfloat16 --algorithm per_step,persistent \\
        --out bench/results/cuda-h100.md
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import types

import conveyor
from conveyor import _conveyor

ALGORITHMS = ("per_step", "persistent", "auto")
GATES = {"lstm": 4, "gru": 3}


def comma_list(kind, choices=None):
    def parse(text):
        items = [kind(item) for item in text.split(",") if item]
        bad = [item for item in items if choices is not None and item not in choices]
        if not items or bad:
            expected = ", ".join(choices) if choices is not None else "numbers"
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {expected}, got {text!r}")
        return items
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", type=comma_list(str, GATES), default=["lstm"], help="lstm, gru or both")
    parser.add_argument("--steps", type=int, default=256, help="T, steps per window")
    parser.add_argument("--batch", type=comma_list(int), default=[1, 16, 64, 256], help="batch sizes B")
    parser.add_argument("--hidden", type=comma_list(int), default=[256, 1024], help="hidden sizes H (= I)")
    parser.add_argument("--dtype", type=comma_list(str, ("float32", "float16", "bfloat16")),
                        default=["float32"])
    parser.add_argument("--algorithm", type=comma_list(str, ALGORITHMS), default=["per_step", "persistent"],
                        help="Conveyor's algorithms to time, each in rows of its own")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 on both sides")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-ms", type=float, default=1500.0,
                        help="stop timing a measurement after this many ms of runs (at least 3 runs)")
    parser.add_argument("--no-floor", action="store_true", help="leave out the persistent kernels' floor")
    parser.add_argument("--out", help="also write the table to this Markdown file, row by row")
    return parser.parse_args(argv)


def median_ms(torch, fn, inputs, repeats, warmup, budget_ms=None):
    """Median ms of fn(input) over up to `repeats` runs (CUDA events), after up to `warmup` runs; with
    `budget_ms`, warm-up stops once it has taken half the budget and timing once it has taken all of it
    (after at least 3 runs)."""
    def timed(x):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    spent = 0.0
    for k in range(max(warmup, 1)):
        spent += timed(inputs[k % len(inputs)])
        if budget_ms is not None and spent > budget_ms / 2:
            break
    times = []
    for k in range(repeats):
        times.append(timed(inputs[k % len(inputs)]))
        if budget_ms is not None and len(times) >= 3 and sum(times) > budget_ms:
            break
    return statistics.median(times)


class Problem:
    """One window's arrays, shared by cuDNN and Conveyor: torch's module and its weights, three inputs, dy."""

    def __init__(self, torch, cell, dtype, T, B, H):
        self.torch, self.cell, self.dtype, self.T, self.B, self.H = torch, cell, dtype, T, B, H
        torch_dtype = getattr(torch, dtype)
        self.module = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(H, H).to("cuda", torch_dtype)
        m = self.module
        self.weights = tuple(p.detach() for p in (m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0))
        assert self.weights[0].shape == (GATES[cell] * H, H)
        self.inputs = [torch.randn(T, B, H, device="cuda", dtype=torch_dtype) for _ in range(3)]
        h0 = torch.randn(1, B, H, device="cuda", dtype=torch_dtype)
        self.state = (h0, h0) if cell == "lstm" else h0
        self.dy = torch.randn(T, B, H, device="cuda", dtype=torch_dtype)


def cudnn_times(problem, timing):
    """(forward ms, forward + backward ms) of torch.nn.LSTM/GRU."""
    torch, module, state, dy = problem.torch, problem.module, problem.state, problem.dy

    def forward(x):
        with torch.no_grad():
            module(x, state)

    def training(x):
        module.zero_grad(set_to_none=True)  # write the gradients, as Conveyor does, rather than add to them
        x.requires_grad_(True)
        y, _ = module(x, state)
        torch.autograd.backward(y, dy)
        x.requires_grad_(False)
        x.grad = None

    return timing(forward, problem.inputs), timing(training, problem.inputs)


def conveyor_times(problem, algorithm, tf32, timing):
    """(forward ms, forward + backward ms) of Conveyor with `algorithm`; either is the reason (a str) where
    the persistent kernel does not fit that direction on this device."""
    forward = getattr(conveyor, f"{problem.cell}_forward")
    backward = getattr(conveyor, f"{problem.cell}_backward")
    options = {"allow_tf32": tf32, "algorithm": algorithm}

    def inference(x):
        forward(x, *problem.weights, training=False, **options)

    def training(x):
        saved = forward(x, *problem.weights, **options)[-1]
        backward(saved, problem.dy)

    results = []
    for fn in (inference, training):
        try:
            results.append(timing(fn, problem.inputs))
        except ValueError as error:  # forcing 'persistent' where it does not fit says why
            message = str(error)
            if "cannot run" not in message:
                raise
            # "algorithm: 'persistent' cannot run this lstm forward window: WHY (use 'auto' or 'per_step')"
            direction = "backward" if " backward window" in message else "forward"
            why = message.split(" window: ", 1)[-1].split(" (use ", 1)[0]
            results.append(f"the {direction} does not fit: {why}")
    return tuple(results)


def floor_times(problem, timing):
    """(forward floor ms, backward floor ms) of the window and the persistent plans' blocks, or (None, None)
    and why."""
    torch, T, B, H = problem.torch, problem.T, problem.B, problem.H
    stream = torch.cuda.current_stream().cuda_stream
    times, plans = [], []
    for direction in ("forward", "backward"):
        def floor(_x, direction=direction):
            plans.append(_conveyor._persistent_floor(T, B, H, problem.dtype, stream, cell=problem.cell,
                                                     direction=direction))
        try:
            times.append(timing(floor, [None]))
        except ValueError as error:
            return (None, None), f"{direction}: {error}"
    forward, backward = plans[0], plans[-1]
    blocks = (f"persistent: {forward['blocks']} x {forward['units']} units forward, "
              f"{backward['blocks']} x {backward['units']} backward")
    return tuple(times), blocks


def ms(value):
    return f"{value:.3f}" if isinstance(value, float) else "-"


def per_step_us(value, T):
    return f"{1e3 * value / T:.2f}" if isinstance(value, float) else "-"


def ratio(a, b):
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"


HEADER = ("| cell | dtype | algorithm | B | H | fwd (ms) | fwd cuDNN (ms) | fwd / cuDNN | fwd µs/step "
          "| fwd / floor | f+b (ms) | f+b cuDNN (ms) | f+b / cuDNN | f+b µs/step | f+b / floor "
          "| floor fwd, bwd µs/step | note |")
ALIGN = "| --- | --- | --- |" + " ---: |" * 13 + " --- |"


def row(problem, algorithm, conveyor_ms, cudnn_ms, floor_ms, note=""):
    T = problem.T
    fwd, both = conveyor_ms
    floor_fwd, floor_bwd = floor_ms
    floor_both = floor_fwd + floor_bwd if floor_fwd is not None and floor_bwd is not None else None
    notes = [note] + sorted({why for why in (fwd, both) if isinstance(why, str)})
    floor_text = "-" if floor_both is None else f"{per_step_us(floor_fwd, T)}, {per_step_us(floor_bwd, T)}"
    return (f"| {problem.cell} | {problem.dtype} | {algorithm} | {problem.B} | {problem.H} | {ms(fwd)} | "
            f"{ms(cudnn_ms[0])} | {ratio(fwd, cudnn_ms[0])} | {per_step_us(fwd, T)} | "
            f"{ratio(fwd, floor_fwd)} | "
            f"{ms(both)} | {ms(cudnn_ms[1])} | {ratio(both, cudnn_ms[1])} | {per_step_us(both, T)} | "
            f"{ratio(both, floor_both)} | {floor_text} | {'; '.join(n for n in notes if n)} |")


class Table:
    """Lines printed and appended to `path` (when given) as they come, each flushed."""

    def __init__(self, path):
        self.file = open(path, "w") if path else None  # open for the whole run, closed at exit

    def add(self, *lines):
        for line in lines:
            print(line, flush=True)
            if self.file is not None:
                self.file.write(line + "\n")
                self.file.flush()


def check_gpu(script):
    """torch, or exits with a message saying what is missing."""
    try:
        import torch
    except ImportError:
        sys.exit(f"{script} needs PyTorch with CUDA (pip install torch)")
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU and PyTorch with CUDA: torch.cuda.is_available() is False")
    if not conveyor.cuda_built() or _conveyor.cuda_emulated():
        sys.exit(f"{script} needs Conveyor built with its CUDA backend for the GPU (this build: "
                 f"{'emulated on the CPU' if conveyor.cuda_built() else 'CPU only'})")
    if not conveyor.cuda_available():
        sys.exit(f"{script}: Conveyor's CUDA backend cannot run on this GPU (python -m conveyor info)")
    return torch


def main(argv=None):
    args = parse_args(argv)
    torch = check_gpu("bench/cuda_rnn.py")
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    props = torch.cuda.get_device_properties(0)
    table = Table(args.out)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    table.add(
        f"# Conveyor CUDA ({', '.join(args.algorithm)}) vs torch.nn.LSTM/GRU (cuDNN), and the persistent "
        "floor",
        "",
        f"- device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
        f"cuDNN {torch.backends.cudnn.version()}; conveyor {conveyor.__version__}; "
        f"Python {platform.python_version()}",
        f"- T={args.steps}, input size = H, TF32 {'on' if args.tf32 else 'off'}; median of up to "
        f"{args.repeats} runs (at least 3, until {args.budget_ms:g} ms of runs) after up to {args.warmup} "
        "warm-up, CUDA events, rotating inputs",
        f"- command: python bench/cuda_rnn.py {command}",
        "- x / cuDNN below 1: Conveyor is faster. x / floor: time per step over the persistent floor's "
        "(f+b: over the forward and backward floors together)",
        "",
        HEADER,
        ALIGN,
    )
    timing_args = types.SimpleNamespace(repeats=args.repeats, warmup=args.warmup, budget_ms=args.budget_ms)

    def timing(fn, inputs):
        return median_ms(torch, fn, inputs, timing_args.repeats, timing_args.warmup, timing_args.budget_ms)

    failures = 0
    for H, B, cell, dtype in itertools.product(args.hidden, args.batch, args.cell, args.dtype):
        try:
            problem = Problem(torch, cell, dtype, args.steps, B, H)
        except Exception as error:  # report the row and go on: the rest of the grid still counts
            failures += 1
            table.add(f"| {cell} | {dtype} | - | {B} | {H} |" + " - |" * 11 + f" error: {describe(error)} |")
            continue
        notes = []
        try:  # a failure on cuDNN's side leaves Conveyor's numbers standing
            cudnn_ms = cudnn_times(problem, timing)
        except Exception as error:
            failures += 1
            cudnn_ms = (None, None)
            notes.append(f"cuDNN error: {describe(error)}")
        floor_ms = (None, None)
        if not args.no_floor:
            try:
                floor_ms, floor_note = floor_times(problem, timing)
                notes.append(floor_note if floor_ms[0] is not None else f"no floor: {floor_note}")
            except Exception as error:
                failures += 1
                notes.append(f"floor error: {describe(error)}")
        for algorithm in args.algorithm:
            try:
                times = conveyor_times(problem, algorithm, args.tf32, timing)
                table.add(row(problem, algorithm, times, cudnn_ms, floor_ms, "; ".join(notes)))
            except Exception as error:
                failures += 1
                table.add(row(problem, algorithm, (None, None), cudnn_ms, floor_ms,
                              "; ".join([*notes, f"error: {describe(error)}"])))
        del problem
    if failures:
        table.add("", f"{failures} measurement(s) failed: see the rows marked error")
    return 1 if failures else 0


def describe(error):
    return f"{type(error).__name__}: {str(error)[:200]}".replace("|", "/").replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
