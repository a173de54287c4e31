"""The regularisers (layer normalisation, zoneout, DropConnect): what they cost and what they buy.

    python bench/regularisers.py cost [--repeats 9] [--threads 1] [--device cpu] --out FILE
    python bench/regularisers.py ptb --data DIR [--epochs 4] --out DIR
    python bench/regularisers.py ptb --data DIR --train-fraction 0.1 --hidden 256 --epochs 12 --out DIR

``cost``: forward + backward of one window through the functional API with each option against the plain cell
(LSTM and GRU, T=64, B=32, I=H=256 and H=512), repetitions interleaved so that the machine's drift falls on
every variant alike; medians, and the ratio to the plain cell beside the prediction (what the option adds to a
window that costs its GEMMs: layer norm about 10 elementwise passes over G*H per token and step, zoneout one
counter draw per unit and step, DropConnect one per entry of R per window). Targets (issue): 1.3 for layer
norm, 1.1 for zoneout and DropConnect.

``ptb``: the small word-level model of "Deep Learning from Scratch 2" (chapter 6: one LSTM layer of 100 units,
embedding 100, T=35, batch 20, SGD lr 20, clip 0.25) trained with ``conveyor train`` for the same number of
epochs with and without variational dropout + weight drop (AWD-LSTM's pair), and with layer norm and zoneout
beside them, validation and test perplexity side by side. ``--train-fraction`` trains on the first part of
the training text only (the same validation and test text), where a wider model overfits within a few epochs
and the regularisers have something to do. Each run's output goes to DIR/<name>.txt and the table to
DIR/table.md as the runs finish.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import numpy as np

import conveyor

# (name, functional keyword arguments, the prediction's extra work relative to the window's GEMMs)
OPTIONS = [
    ("plain", {}, "1.00"),
    ("layer_norm", {"layer_norm": True}, "1.02-1.10"),
    ("zoneout", {"zoneout": 0.1, "zoneout_cell": 0.1}, "1.02-1.05"),
    ("weight_dropout", {"weight_dropout": 0.5}, "1.00-1.01"),
    ("all three", {"layer_norm": True, "zoneout": 0.1, "zoneout_cell": 0.1, "weight_dropout": 0.5},
     "1.05-1.15"),
]
POINTS = [("lstm", 64, 32, 256, 256), ("lstm", 64, 32, 512, 512), ("gru", 64, 32, 256, 256)]


def window(cell, T, B, I, H, options, rng, device="cpu"):
    """A closure running forward + backward of one window with `options` (NumPy arrays on the CPU; PyTorch
    CUDA tensors on a GPU, the closure waiting for the device)."""
    G = {"lstm": 4, "gru": 3}[cell]
    w = 1 / np.sqrt(H)
    on = np.asarray
    wait = None
    if device == "cuda":
        import torch

        def on(a):
            return torch.as_tensor(a, device="cuda")

        wait = torch.cuda.synchronize
    x = on(rng.uniform(-1, 1, (T, B, I)).astype(np.float32))
    W, R = (on(rng.uniform(-w, w, s).astype(np.float32)) for s in ((G * H, I), (G * H, H)))
    bW, bR = (on(rng.uniform(-w, w, G * H).astype(np.float32)) for _ in range(2))
    dy = on(rng.uniform(-1, 1, (T, B, H)).astype(np.float32))
    options = dict(options)
    if options.pop("layer_norm", False):
        gains = [np.ones(G * H, np.float32), np.ones(G * H, np.float32)]
        if cell == "lstm":
            gains += [np.ones(H, np.float32), np.zeros(H, np.float32)]
        options["layer_norm"] = tuple(on(g) for g in gains)
    if cell == "gru":
        options.pop("zoneout_cell", None)
    forward, backward = getattr(conveyor, f"{cell}_forward"), getattr(conveyor, f"{cell}_backward")

    def run():
        saved = forward(x, W, R, bW, bR, seed=1, **options)[-1]
        backward(saved, dy)
        if wait is not None:
            wait()

    return run


def cost(args) -> int:
    conveyor.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {os.cpu_count()} cores, {args.threads} thread(s)"
    if args.device == "cuda":
        import torch

        from conveyor import _conveyor

        if not torch.cuda.is_available() or not conveyor.cuda_built() or _conveyor.cuda_emulated():
            sys.exit("bench/regularisers.py cost --device cuda needs a GPU, PyTorch with CUDA and Conveyor's "
                     "CUDA backend built for it (not emulated)")
        machine = f"{torch.cuda.get_device_name()} (the functional API on PyTorch CUDA tensors)"
    lines = [f"# Regularisers' cost: forward + backward of one window, {args.device}",
             "", f"Machine: {machine}; float32; medians of {args.repeats} interleaved repetitions.",
             "Command: `python bench/regularisers.py cost "
             f"--repeats {args.repeats} --threads {args.threads} --device {args.device}`",
             "", "| cell T B I H | option | ms | ratio to plain | predicted | target |",
             "| --- | --- | --- | --- | --- | --- |"]
    for cell, T, B, I, H in POINTS:
        runs = {name: window(cell, T, B, I, H, options, rng, args.device) for name, options, _ in OPTIONS}
        for run in runs.values():
            run()  # warm up
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        plain = statistics.median(times["plain"])
        for name, _, predicted in OPTIONS:
            median = statistics.median(times[name])
            target = {"layer_norm": "1.3", "zoneout": "1.1", "weight_dropout": "1.1"}.get(name, "")
            lines.append(f"| {cell} {T} {B} {I} {H} | {name} | {median * 1e3:.1f} | {median / plain:.2f} | "
                         f"{predicted} | {target} |")
            print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


# The epochs bound a run (--max-steps lifts the lm task's default of 300 steps).
PTB = ["--level", "word", "--layers", "1", "--bptt", "35", "--batch", "20", "--optimizer", "sgd", "--lr",
       "20", "--clip", "0.25", "--print-every", "500", "--sample", "0", "--max-steps", "1000000"]


def runs(p):
    awd = ["--dropout", str(p), "--variational", "--weight-dropout", str(p)]
    return [("plain", []),
            (f"variational dropout {p} + weight drop {p}", awd),
            ("the same + layer norm + zoneout 0.1",
             awd + ["--layer-norm", "--zoneout", "0.1", "--zoneout-cell", "0.1"])]


TABLE_HEAD = ("| run | flags | validation perplexity, best (step) | validation perplexity, last | "
              "test perplexity (last) | time |")


def table_row(name, flags, output, seconds) -> str:
    """A run's row from its output: the best validation seen (the step where early stopping would keep the
    model), the last one, and the test perplexity of the last model."""
    valid = [(float(p), int(step)) for step, p in re.findall(r"step (\d+): validation [0-9.]+ \(perplexity "
                                                              r"([0-9.]+)\)", output)]
    last = re.findall(r"validation [0-9.]+ \(perplexity ([0-9.]+)\)", output)[-1]
    best = min(valid + [(float(last), 0)])
    test = re.search(r"^test [0-9.]+ \(perplexity ([0-9.]+)\)", output, re.M).group(1)
    step = f"step {best[1]}" if best[1] else "end"
    return (f"| {name} | `{' '.join(flags) or '-'}` | {best[0]:.2f} ({step}) | {last} | **{test}** | "
            f"{seconds:.0f} s |")


def training_subset(data, fraction, folder) -> str:
    """A PTB folder whose training text is the first `fraction` of the lines of DIR's (validation and test
    whole), for the overfitting runs; written under `folder`, outside the repository."""
    import gzip
    import shutil

    os.makedirs(folder, exist_ok=True)
    train = os.path.join(data, "ptb.train.txt")
    opener = (lambda: gzip.open(train + ".gz", "rt")) if not os.path.exists(train) else (lambda: open(train))
    with opener() as f:
        lines = f.readlines()
    with open(os.path.join(folder, "ptb.train.txt"), "w") as f:
        f.writelines(lines[:int(len(lines) * fraction)])
    for split in ("valid", "test"):
        shutil.copy(os.path.join(data, f"ptb.{split}.txt"), folder)
    return folder


def ptb(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    data = args.data
    if args.train_fraction < 1:
        import tempfile

        data = training_subset(args.data, args.train_fraction, tempfile.mkdtemp(prefix="conveyor-ptb-"))
    model = ["--hidden", str(args.hidden), "--embedding", str(args.hidden)]
    rows = []
    for name, flags in runs(args.dropout):
        command = [sys.executable, "-m", "conveyor", "train", "--data", data, *PTB, *model, "--epochs",
                   str(args.epochs), *flags]
        start = time.time()
        out = subprocess.run(command, capture_output=True, text=True)
        shown = " ".join(["conveyor", "train", "--data", "ptb", *command[6:]])
        if args.train_fraction < 1:
            shown += f"  # training text: the first {args.train_fraction:.0%} of ptb.train.txt's lines"
        text = f"$ {shown}\n{out.stdout}{out.stderr}"
        slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
        with open(os.path.join(args.out, f"{slug}.txt"), "w") as f:
            f.write(text)
        if out.returncode != 0:
            print(text, file=sys.stderr)
            return 1
        rows.append(table_row(name, flags, out.stdout, time.time() - start))
        print(rows[-1], flush=True)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write("\n".join([
                f"# PTB word level, one LSTM layer of {args.hidden} units, {args.epochs} epochs, CPU"
                + ("" if args.train_fraction == 1 else
                   f", trained on the first {args.train_fraction:.0%} of the training text"),
                "", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores. Common "
                f"flags: `{' '.join(PTB + model)} --epochs {args.epochs}`; the whole outputs are beside this "
                "file.",
                "", TABLE_HEAD, "| --- | --- | --- | --- | --- | --- |", *rows, ""]))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--repeats", type=int, default=9)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--out", required=True)
    p = sub.add_parser("ptb")
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--hidden", type=int, default=100, help="units (and embedding size); default 100 (DLFS2)")
    p.add_argument("--dropout", type=float, default=0.3, help="of the regularised runs (both kinds)")
    p.add_argument("--train-fraction", type=float, default=1.0)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    return cost(args) if args.what == "cost" else ptb(args)


if __name__ == "__main__":
    sys.exit(main())
