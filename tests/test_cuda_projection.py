"""The LSTM's projection (LSTMP, ``W_hr``; docs/math.md) on the CUDA backend, which runs it on the per-step
kernels: with lengths (on the host and on the device) and with recurrent dropout against the CPU backend in
float64 (itself checked against the float64 reference in test_variants.py and test_lengths.py); float32
against the float64 reference at shapes on both sides of the kernels' tiles; float16 and bfloat16 within
twice the error of a naive computation in the same dtype, as test_cuda.py bounds them; and
``algorithm="persistent"`` refused, saying why, where ``"auto"`` falls back to the per-step kernels. The
emulated build and a GPU alike (device_arrays.py); outputs NaN-poisoned (conftest.py), padded dy NaN."""

import os
import subprocess
import sys

import numpy as np
import pytest
from device_arrays import DeviceArray
from test_cuda import UNIT_ROUNDOFF, dtype_of
from test_lengths import pack_padded, poison_padding, random_lengths
from test_variants import LSTM_OPTIONS, lstm_id, lstm_problem, reference_lstm

import conveyor

from support import assert_close

pytestmark = pytest.mark.cuda

PROJECTED_OPTIONS = [o for o in LSTM_OPTIONS if o["proj_size"]]

SHAPES = [  # (T, B, I, H, P): step tiles of 16 rows and 32 units, rows ending mid-tile; P below and above H
    (1, 1, 3, 5, 2),
    (5, 4, 3, 7, 3),
    (7, 17, 9, 33, 20),
    (4, 20, 6, 20, 35),
]


def shape_id(shape):
    return "T{}-B{}-I{}-H{}-P{}".format(*shape)


def problem(o, shape, rng):
    """Fresh random inputs of `shape` with the options `o` and a projection of size P."""
    T, B, I, H, P = shape
    return lstm_problem({**o, "proj_size": P}, T, B, I, H, rng)


def run(p, o, dtype=None, **options):
    """Forward and backward: every output and gradient as float64 NumPy arrays (None where absent). With
    `dtype`, on the device in that dtype (the cell-state arrays of its cell-state dtype); else on the CPU."""
    a = dict(p)
    if dtype is not None:
        a = {k: None if v is None else DeviceArray.from_numpy(v, dtype_of(k, dtype)) for k, v in p.items()}
    y, h_T, c_T, saved = conveyor.lstm_forward(
        a["x"], a["W"], a["R"], a["bW"], a["bR"], a["h0"], a["c0"], P=a["P"], W_hr=a["W_hr"],
        coupled_gates=o["coupled_gates"], forget_bias=o["forget_bias"], cell_clip=o["cell_clip"],
        activation=o["activation"], **options)
    grads = conveyor.lstm_backward(saved, a["dy"], a["dh_T"], a["dc_T"])._asdict()
    results = {"y": y, "h_T": h_T, "c_T": c_T, **grads}
    for name, value in results.items():
        if value is not None and dtype is not None:
            assert isinstance(value, DeviceArray) and value.dtype == dtype_of(name, dtype), name
    return {k: None if v is None else np.asarray(v.numpy() if dtype else v, np.float64)
            for k, v in results.items()}


def assert_same(got, expected, dtype):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, name
        else:
            assert_close(name, got[name].astype(dtype), value, np.dtype(dtype))


@pytest.mark.parametrize("algorithm", ["per_step", "auto"])
@pytest.mark.parametrize("lengths_on", ["host", "device"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("o", PROJECTED_OPTIONS[::5], ids=lstm_id)
def test_lengths_match_the_cpu(o, shape, lengths_on, algorithm, rng):
    p = problem(o, shape, rng)
    lengths = random_lengths(rng, *shape[:2])
    p["dy"] = poison_padding(p["dy"], lengths)
    expected = run(p, o, lengths=lengths)
    given = lengths if lengths_on == "host" else DeviceArray.from_numpy(lengths.astype(np.int32), "int32")
    got = run(p, o, "float64", lengths=given, algorithm=algorithm)
    for b, n in enumerate(lengths):
        assert not np.any(got["y"][n:, b]), f"y: nonzero past row {b}'s length {n}"
        assert not np.any(got["dx"][n:, b]), f"dx: nonzero past row {b}'s length {n}"
    assert_same(got, expected, np.float64)


@pytest.mark.parametrize("lengths", [False, True], ids=["dense", "device-lengths"])
@pytest.mark.parametrize("variational", [True, False], ids=["variational", "per-step-masks"])
@pytest.mark.parametrize("o", PROJECTED_OPTIONS[::7], ids=lstm_id)
def test_recurrent_dropout_matches_the_cpu(o, variational, lengths, rng):
    """The masks cover h_{t-1} as the product reads it: [T, B, P], each row its own."""
    shape = (6, 5, 3, 7, 4)
    p = problem(o, shape, rng)
    dropout = dict(recurrent_dropout=0.4, variational=variational, seed=13, mask_stream=5)
    row_lengths = random_lengths(rng, *shape[:2]) if lengths else None
    if lengths:
        p["dy"] = poison_padding(p["dy"], row_lengths)
    expected = run(p, o, lengths=row_lengths, **dropout)
    given = DeviceArray.from_numpy(row_lengths.astype(np.int32), "int32") if lengths else None
    got = run(p, o, "float64", lengths=given, algorithm="per_step", **dropout)
    assert_same(got, expected, np.float64)
    without = run(p, o, "float64", lengths=given, algorithm="per_step")
    assert not np.allclose(without["dR"], got["dR"]), "the masks changed nothing: a weak test"


def test_packed_arrays_match_the_cpu(rng):
    """ForwardArgs::packed: x, y, dy and dx as a PackedSequence's data, y and dy P wide."""
    o = PROJECTED_OPTIONS[1]
    T, B = 6, 7
    p = problem(o, (T, B, 5, 9, 4), rng)
    lengths = np.sort(random_lengths(rng, T, B))[::-1].copy()
    p["x"], p["dy"] = pack_padded(p["x"], lengths), pack_padded(p["dy"], lengths)
    dropout = dict(recurrent_dropout=0.3, variational=False, seed=2)
    expected = run(p, o, lengths=lengths, _packed=True, **dropout)
    assert expected["y"].shape == (lengths.sum(), 4)
    got = run(p, o, "float64", lengths=lengths, _packed=True, algorithm="per_step", **dropout)
    assert_same(got, expected, np.float64)


@pytest.mark.parametrize("shape", [(5, 17, 40, 70, 33), (3, 33, 65, 129, 40), (4, 3, 5, 7, 3)], ids=shape_id)
@pytest.mark.parametrize("o", [o for o in PROJECTED_OPTIONS if not o["cell_clip"]][::3], ids=lstm_id)
def test_float32_matches_the_reference(o, shape, rng):
    """Without the clip: float32 could land on the other side of its bound than float64 (test_cuda_variants
    covers the clip on a problem clear of it)."""
    p = problem(o, shape, rng)
    expected, _ = reference_lstm(p, {**o, "proj_size": shape[-1]})
    assert_same(run(p, o, "float32", algorithm="per_step"), expected, np.float32)


def naive_torch(p, o, dtype):
    """The projected LSTM in PyTorch's ops in `dtype` (on the GPU where PyTorch has one), autograd for the
    gradients: what a naive computation in that dtype gets."""
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype)
    where = "cuda" if torch.cuda.is_available() else "cpu"

    def leaf(name):
        return torch.tensor(p[name], dtype=dt, device=where, requires_grad=True)

    names = ("x", "W", "R", "bW", "bR", "h0", "c0", "W_hr")
    x, W, R, bW, bR, h0, c0, W_hr = (leaf(n) for n in names)
    H = W_hr.shape[1]
    act = torch.relu if o["activation"] == "relu" else torch.tanh
    h, c, ys = h0, c0, []
    for t in range(x.shape[0]):
        a = x[t] @ W.t() + bW + h @ R.t() + bR
        i, f, g, out = (a[:, k * H:(k + 1) * H] for k in range(4))
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * act(g)
        h = (torch.sigmoid(out) * act(c)) @ W_hr.t()
        ys.append(h)
    y = torch.stack(ys)
    upstream = {n: torch.tensor(p[n], dtype=dt, device=where) for n in ("dy", "dh_T", "dc_T")}
    loss = (y * upstream["dy"]).sum() + (h * upstream["dh_T"]).sum() + (c * upstream["dc_T"]).sum()
    grads = torch.autograd.grad(loss, [x, W, R, bW, bR, h0, c0, W_hr])
    results = {"y": y, "h_T": h, "c_T": c, **dict(zip(("dx", "dW", "dR", "dbW", "dbR", "dh0", "dc0", "dW_hr"),
                                                      grads))}
    return {k: v.detach().to(torch.float64).cpu().numpy() for k, v in results.items()}


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_within_twice_the_naive_error(dtype, activation, rng):
    o = dict(PROJECTED_OPTIONS[0], activation=activation)
    assert not (o["peephole"] or o["coupled_gates"] or o["forget_bias"] or o["cell_clip"])
    p = problem(o, (6, 5, 24, 40, 16), rng)
    if activation == "relu":  # clear of the kink, as test_cuda.clear_of_the_relu_kink: g's bias +-3, c >= 0
        H = 40
        p["bW"][2 * H:3 * H] = 3.0 * rng.choice([-1.0, 1.0], H)
        p["c0"] = np.abs(p["c0"])
    expected, _ = reference_lstm(p, o)
    got = run(p, o, dtype, algorithm="auto")
    naive = naive_torch(p, o, dtype)
    for name, exact in expected.items():
        if exact is None:
            assert got[name] is None, name
            continue
        assert np.all(np.isfinite(got[name])), f"{name}: non-finite elements"
        ours = np.max(np.abs(got[name] - exact))
        bound = 2 * np.max(np.abs(naive[name] - exact)) + UNIT_ROUNDOFF[dtype] * np.max(np.abs(exact))
        assert ours <= bound, (f"{name}: max error {ours:.3g} > bound {bound:.3g} "
                               f"(twice the naive {dtype} error)")


def test_persistent_refuses_a_projection_and_auto_runs_it_per_step(rng):
    """B <= 32, where 'auto' would take the persistent kernels: with a projection it takes the per-step ones,
    bit for bit; 'persistent' forced raises before any work, naming the projection."""
    o = PROJECTED_OPTIONS[0]
    p = problem(o, (4, 3, 5, 6, 2), rng)
    with pytest.raises(ValueError, match=r"algorithm: 'persistent' cannot run this lstm forward window: a "
                                         r"projection \(W_hr\) runs on the per-step kernels"):
        run(p, o, "float32", algorithm="persistent")
    auto, per_step = run(p, o, "float32", algorithm="auto"), run(p, o, "float32", algorithm="per_step")
    for name, value in per_step.items():
        if value is not None:
            np.testing.assert_array_equal(auto[name], value, err_msg=name)


def test_auto_logs_why_a_projection_runs_per_step():
    """CONVEYOR_LOG_ALGORITHM=1 (read once per process, hence a process of its own) names the reason."""
    script = (
        "import numpy as np, conveyor\n"
        "from device_arrays import DeviceArray\n"
        "d = lambda *s: DeviceArray.from_numpy(np.random.default_rng(1).uniform(-0.5, 0.5, s), 'float32')\n"
        "y, h, c, saved = conveyor.lstm_forward(d(3, 2, 4), d(20, 4), d(20, 3), None, None, W_hr=d(3, 5))\n"
        "conveyor.lstm_backward(saved, d(3, 2, 3))\n")
    env = {**os.environ, "CONVEYOR_LOG_ALGORITHM": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(__file__), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    why = "per_step (persistent does not fit: a projection (W_hr) runs on the per-step kernels)"
    assert f"conveyor: lstm forward: {why}" in done.stderr
    assert f"conveyor: lstm backward: {why}" in done.stderr
