"""Variable-length batches on the CUDA backend, per-step and persistent kernels: every cell and option with
``lengths`` against the CPU backend (itself checked against the float64 reference row by row in
test_lengths.py) in float64 and float32, with the lengths on the host or on the device; padded dy NaN, so
a read of it shows; outputs NaN-poisoned; bit-for-bit determinism. Runs on a GPU and in the emulated
build alike (device_arrays.py)."""

import numpy as np
import pytest
from device_arrays import DeviceArray
from test_lengths import finals, pack_padded, poison_padding, random_lengths, run_with_lengths, states

import conveyor

from support import CONFIGS, assert_close, config_id, make_problem

pytestmark = pytest.mark.cuda

SHAPES = [  # (T, B, I, H): tiles of 16 rows and 32 units on both sides, rows ending mid-tile
    (1, 1, 3, 5),
    (5, 4, 3, 7),
    (7, 17, 9, 33),
    (4, 40, 6, 20),
]

TOLERANCE_DTYPE = {"float64": np.float64, "float32": np.float32}


@pytest.fixture(params=["per_step", "persistent"])
def algorithm(request):
    return request.param


def to_device(a, dtype):
    return None if a is None else DeviceArray.from_numpy(a, dtype)


def run_on_device(p, lengths, dtype, algorithm, **options):
    forward = getattr(conveyor, f"{p.cell}_forward")
    backward = getattr(conveyor, f"{p.cell}_backward")
    d = [to_device(a, dtype) for a in (p.x, p.W, p.R, p.bW, p.bR, *states(p))]
    out = forward(*d, lengths=lengths, algorithm=algorithm, **p.options, **options)
    grads = backward(out[-1], to_device(p.dy, dtype), *(to_device(a, dtype) for a in finals(p)))._asdict()
    grads.pop("dP", None)
    numpy = {name: None if g is None else g.numpy() for name, g in grads.items()}
    return out[0].numpy(), out[1].numpy(), out[2].numpy() if p.cell == "lstm" else None, numpy


def assert_same_as_cpu(got, cpu, dtype, lengths):
    y, h_T, c_T, grads = got
    for b, n in enumerate(lengths):
        assert not np.any(y[n:, b]), f"y: nonzero past row {b}'s length {n}"
        assert not np.any(grads["dx"][n:, b]), f"dx: nonzero past row {b}'s length {n}"
    assert_close("y", y, cpu[0], dtype)
    assert_close("h_T", h_T, cpu[1], dtype)
    if c_T is not None:
        assert_close("c_T", c_T, cpu[2], dtype)
    for name, value in cpu[3].items():
        if value is None:
            assert grads[name] is None, name
        else:
            assert_close(name, grads[name], value, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_cpu(config, shape, dtype, algorithm, rng):
    p = make_problem(*config, *shape, rng)
    lengths = random_lengths(rng, shape[0], shape[1])
    p.dy = poison_padding(p.dy, lengths)
    cpu = run_with_lengths(p.cast(TOLERANCE_DTYPE[dtype]), lengths)
    got = run_on_device(p, lengths, dtype, algorithm)
    assert_same_as_cpu(got, cpu, TOLERANCE_DTYPE[dtype], lengths)


@pytest.mark.parametrize("variational", [True, False], ids=["variational", "per-step-masks"])
@pytest.mark.parametrize("config", CONFIGS[::2], ids=config_id)
def test_recurrent_dropout_and_device_lengths(config, variational, algorithm, rng):
    """Each row's own masks, and lengths given on the device (int32): the backend copies them to the host."""
    T, B = 6, 5
    p = make_problem(*config, T, B, 3, 6, rng)
    lengths = random_lengths(rng, T, B)
    p.dy = poison_padding(p.dy, lengths)
    dropout = {"recurrent_dropout": 0.4, "variational": variational, "seed": 7, "mask_stream": 2}
    cpu = run_with_lengths(p, lengths, **dropout)
    on_device = DeviceArray.from_numpy(lengths.astype(np.int32), "int32")
    got = run_on_device(p, on_device, "float64", algorithm, **dropout)
    assert_same_as_cpu(got, cpu, np.float64, lengths)


@pytest.mark.parametrize("variant", ["peephole", "coupled-clip"])
def test_lstm_options(variant, algorithm, rng):
    T, B, I, H = 6, 5, 4, 6
    p = make_problem("lstm", {}, T, B, I, H, rng)
    options = {"forget_bias": 1.0, "cell_clip": 0.4} if variant == "coupled-clip" else {}
    if variant == "coupled-clip":
        p.W, p.R, p.bW, p.bR = p.W[H:], p.R[H:], p.bW[H:], p.bR[H:]
        options["coupled_gates"] = True
    P = rng.uniform(-0.5, 0.5, (3, H)) if variant == "peephole" else None
    lengths = random_lengths(rng, T, B)
    dy = poison_padding(p.dy, lengths)
    out = conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0, P=P, lengths=lengths, **options)
    g = conveyor.lstm_backward(out[-1], dy, p.dh_T, p.dc_T)
    d = [to_device(a, "float64") for a in (p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0)]
    dout = conveyor.lstm_forward(*d, P=to_device(P, "float64"), lengths=lengths, algorithm=algorithm,
                                 **options)
    dg = conveyor.lstm_backward(dout[-1], to_device(dy, "float64"), to_device(p.dh_T, "float64"),
                                to_device(p.dc_T, "float64"))
    for name, a, b in (("y", dout[0], out[0]), ("c_T", dout[2], out[2]), *zip(g._fields, dg, g)):
        if b is not None:
            assert_close(name, a.numpy(), b, np.float64)


def test_deterministic(algorithm, rng):
    p = make_problem("gru", {"reset_after": True}, 6, 9, 5, 17, rng)
    lengths = random_lengths(rng, 6, 9)
    first = run_on_device(p, lengths, "float32", algorithm)
    second = run_on_device(p, lengths, "float32", algorithm)
    assert all(np.array_equal(a, b) for a, b in zip(first[:2], second[:2]))
    assert all(np.array_equal(first[3][k], second[3][k]) for k in first[3] if first[3][k] is not None)


def test_bad_lengths_on_the_device_are_named(rng):
    p = make_problem("rnn", {}, 4, 3, 2, 3, rng)
    d = [to_device(a, "float32") for a in (p.x, p.W, p.R)]
    with pytest.raises(ValueError, match=r"lengths: expected every length in \[1, T\] = \[1, 4\], got "
                                         r"lengths\[2\] = 9"):
        lengths = DeviceArray.from_numpy(np.array([1, 2, 9], np.int32), "int32")
        conveyor.rnn_forward(*d, None, None, lengths=lengths)


@pytest.mark.parametrize("config", CONFIGS[::2], ids=config_id)
def test_packed_arrays(config, algorithm, rng):
    """ForwardArgs::packed on the device: x, y, dy and dx as a PackedSequence's data, against the CPU."""
    T, B = 6, 7
    p = make_problem(*config, T, B, 5, 9, rng)
    lengths = np.sort(random_lengths(rng, T, B))[::-1].copy()
    x, dy = pack_padded(p.x, lengths), pack_padded(p.dy, lengths)
    forward = getattr(conveyor, f"{p.cell}_forward")
    backward = getattr(conveyor, f"{p.cell}_backward")
    cpu = forward(x, p.W, p.R, p.bW, p.bR, *states(p), lengths=lengths, _packed=True, **p.options)
    cpu_grads = backward(cpu[-1], dy, *finals(p))
    d = [to_device(a, "float64") for a in (x, p.W, p.R, p.bW, p.bR, *states(p))]
    out = forward(*d, lengths=lengths, _packed=True, algorithm=algorithm, **p.options)
    grads = backward(out[-1], to_device(dy, "float64"), *(to_device(a, "float64") for a in finals(p)))
    assert_close("y", out[0].numpy(), cpu[0], np.float64)
    assert_close("h_T", out[1].numpy(), cpu[1], np.float64)
    for name, a, b in zip(cpu_grads._fields, grads, cpu_grads):
        if b is not None:
            assert_close(name, a.numpy(), b, np.float64)
