"""Variable-length batches on the CPU: packed against padded, Conveyor beside torch.nn, in one run.

    python bench/packed.py [--threads 1] [--repeats 11] [--quick] [--out FILE.md]

Each point draws lengths uniform in [T/4, T] (seeded), so about 5/8 of the padded tokens are present, and
times forward+backward (training mode, the gradient of a weighted sum of the outputs into every weight),
float32, interleaved (medians):

- Conveyor padded: conveyor.torch on the padded [T, B, I] tensor, every row all T steps;
- Conveyor packed: conveyor.torch on the PackedSequence of the same sequences (pack_padded_sequence,
  enforce_sorted=False), which runs each row's own steps only;
- torch.nn padded and torch.nn packed, the same;
- for one-layer points, the functional API (``conveyor.lstm_forward`` / ``_backward`` and the GRU's) with and
  without ``lengths``: the kernels alone, without the PackedSequence's padding and packing copies.

The target (the variable-length issue): Conveyor packed <= Conveyor padded x (the fraction of tokens present)
+ 10%, printed as "packed / (padded x fraction)", which must be <= 1.10. The ratio columns are torch time /
Conveyor time (above 1, Conveyor is faster)."""

from __future__ import annotations

import argparse
import platform
import sys

import numpy as np

import conveyor

try:
    import torch

    import conveyor.torch as ct
except ImportError:
    sys.exit("bench/packed.py compares with torch.nn: pip install torch")

from cpu import interleaved  # noqa: E402 (bench/ is the script's directory)

# (cell, T, B, I, H, layers, bidirectional)
POINTS = [("lstm", 64, 32, 256, 256, 1, False), ("gru", 64, 32, 256, 256, 1, False),
          ("lstm", 100, 16, 128, 128, 2, True), ("lstm", 35, 64, 200, 200, 2, False)]


def point(cell, T, B, I, H, layers, bidirectional, repeats, seed=0):
    rng = np.random.default_rng(seed)
    lengths = torch.from_numpy(rng.integers(T // 4, T + 1, size=B))
    lengths[0] = T  # the padded batch is T long
    x = torch.from_numpy(rng.standard_normal((T, B, I), dtype=np.float32))
    reference = getattr(torch.nn, cell.upper())(I, H, num_layers=layers, bidirectional=bidirectional)
    ours = getattr(ct, cell.upper())(I, H, num_layers=layers, bidirectional=bidirectional)
    ours.load_state_dict(reference.state_dict())
    directions = 2 if bidirectional else 1
    weight = torch.from_numpy(rng.standard_normal((T, B, directions * H), dtype=np.float32))
    pack = torch.nn.utils.rnn.pack_padded_sequence

    def padded(module):
        def run():
            module.zero_grad()
            y = module(x.requires_grad_(False))[0]
            (y * weight).sum().backward()
        return run

    # The same loss on the packed outputs: the weights of the tokens present, in the packed order.
    packed_weight = pack(weight, lengths, enforce_sorted=False).data

    def packed(module):
        def run():
            module.zero_grad()
            y = module(pack(x, lengths, enforce_sorted=False))[0]
            (y.data * packed_weight).sum().backward()
        return run

    # The same numbers both ways: the packed outputs of Conveyor and torch.nn agree.
    with torch.no_grad():
        sequences = pack(x, lengths, enforce_sorted=False)
        ours_y, torch_y = (module(sequences)[0].data for module in (ours, reference))
    assert torch.allclose(ours_y, torch_y, atol=1e-4), "Conveyor and torch.nn disagree on packed input"

    runs = [padded(ours), packed(ours), padded(reference), packed(reference)]
    if layers == 1 and not bidirectional:
        forward = getattr(conveyor, f"{cell}_forward")
        backward = getattr(conveyor, f"{cell}_backward")
        arrays = [p.detach().numpy() for p in (reference.weight_ih_l0, reference.weight_hh_l0,
                                                reference.bias_ih_l0, reference.bias_hh_l0)]
        x_numpy, dy, host_lengths = x.numpy(), weight.numpy(), lengths.numpy()

        def functional(with_lengths):
            def run():
                out = forward(x_numpy, *arrays, lengths=host_lengths if with_lengths else None)
                backward(out[-1], dy)
            return run

        runs += [functional(False), functional(True)]
    times = interleaved(runs, repeats)
    fraction = float(lengths.sum()) / (T * B)
    return times, fraction


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="the first point only, 3 repeats")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    conveyor.set_num_threads(args.threads)
    points = POINTS[:1] if args.quick else POINTS
    repeats = 3 if args.quick else args.repeats
    lines = [f"Machine: {platform.processor() or platform.machine()}, {args.threads} thread(s); torch "
             f"{torch.__version__}; conveyor {conveyor.__version__}; float32, forward+backward, medians of "
             f"{repeats} interleaved repetitions; lengths uniform in [T/4, T].",
             "",
             "| point (cell T B I H, layers, directions) | tokens present | Conveyor padded ms | "
             "Conveyor packed ms | packed / (padded x fraction) | torch.nn padded ms | torch.nn packed ms | "
             "ratio padded | "
             "ratio packed | functional API padded / packed ms | functional packed / (padded x fraction) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for cell, T, B, I, H, layers, bidirectional in points:
        times, fraction = point(cell, T, B, I, H, layers, bidirectional, repeats)
        ours_pad, ours_pack, torch_pad, torch_pack = times[:4]
        functional = "- | -"
        if len(times) == 6:
            functional = (f"{times[4] * 1e3:.1f} / {times[5] * 1e3:.1f} | "
                          f"{times[5] / (times[4] * fraction):.2f}")
        row = (f"| {cell} {T} {B} {I} {H}, {layers}, {2 if bidirectional else 1} | {fraction:.3f} | "
               f"{ours_pad * 1e3:.1f} | {ours_pack * 1e3:.1f} | {ours_pack / (ours_pad * fraction):.2f} | "
               f"{torch_pad * 1e3:.1f} | {torch_pack * 1e3:.1f} | {torch_pad / ours_pad:.2f} | "
               f"{torch_pack / ours_pack:.2f} | {functional} |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
