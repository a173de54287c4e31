"""The polyphonic-music comparison of Chung, Gulcehre, Cho & Bengio 2014 (Table 2), run with
``conveyor train --task music``: a tanh RNN of 100 units, a GRU of 46 and an LSTM of 36 (about 20k
parameters each) on JSB Chorales and Nottingham, test NLL per frame at the best validation (early stopping),
beside the paper's figures.

    python bench/music.py --data-dir DIR [--sets JSB_Chorales Nottingham] [--epochs 200] --out OUT_DIR

DIR holds the Boulanger-Lewandowski sets as .mat files (JSB_Chorales.mat, Nottingham.mat). Each run's whole
output goes to OUT_DIR/<set>-<cell>.txt and the table to OUT_DIR/table.md, written as the runs finish."""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time

# Chung et al. 2014, Table 2: test NLL per frame.
PAPER = {"JSB_Chorales": {"rnn": 9.10, "gru": 8.54, "lstm": 8.67},
         "Nottingham": {"rnn": 3.22, "gru": 3.13, "lstm": 3.33}}
UNITS = {"rnn": 100, "gru": 46, "lstm": 36}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--sets", nargs="+", default=list(PAPER))
    parser.add_argument("--cells", nargs="+", default=["rnn", "gru", "lstm"])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.sets:
        for cell in args.cells:
            command = ["conveyor", "train", "--task", "music", "--data",
                       os.path.join(args.data_dir, f"{name}.mat"), "--cell", cell,
                       "--epochs", str(args.epochs), "--print-every", "1000"]
            start = time.time()
            out = subprocess.run(command, capture_output=True, text=True)
            shown = f"{' '.join(command[:4])} --data {name}.mat {' '.join(command[6:])}"
            text = f"$ {shown}\n{out.stdout}{out.stderr}"
            with open(os.path.join(args.out, f"{name}-{cell}.txt"), "w") as f:
                f.write(text)
            if out.returncode != 0:
                print(text, file=sys.stderr)
                return 1
            best = re.search(r"best validation ([0-9.]+) nats/frame at step (\d+); test there ([0-9.]+)",
                             out.stdout)
            final = re.search(r"^test ([0-9.]+) nats/frame", out.stdout, re.M)
            params = re.search(r"; ([0-9,]+) parameters", out.stdout).group(1)
            valid, step, test = (best.group(1), best.group(2), best.group(3)) if best else \
                (re.search(r"validation ([0-9.]+) nats/frame\n", out.stdout).group(1), "last", final.group(1))
            rows.append(f"| {name} | {cell} | {UNITS[cell]} | {params} | {valid} (step {step}) | "
                        f"**{test}** | {PAPER.get(name, {}).get(cell, '-')} | {time.time() - start:.0f} s |")
            write_table(args, rows)
            print(rows[-1], flush=True)
    return 0


def write_table(args, rows):
    with open(os.path.join(args.out, "table.md"), "w") as f:
        machine = platform.processor() or platform.machine()
        f.write(f"Chung et al. 2014 (Table 2) beside `conveyor train --task music`, {args.epochs} epochs, "
                f"Adam lr 3e-3, batch 8, clip 1; test NLL per frame (nats, summed over the 88 keys) of the "
                f"parameters with the best validation NLL. Machine: {machine}, {os.cpu_count()} cores. "
                f"Command: `python bench/music.py --data-dir DIR --epochs {args.epochs} --out OUT`.\n\n")
        f.write("| set | cell | units | parameters | best validation NLL | test NLL | paper's test NLL "
                "| time |\n")
        f.write("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
        f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
