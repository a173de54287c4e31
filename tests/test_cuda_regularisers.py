"""The regularisers (docs/math.md, "Regularisers": DropConnect on R, zoneout, layer normalisation) on the
CUDA backend: each alone and all together, for every cell they apply to and the LSTM's options, with the
projection and with lengths on the host and the device, on the per-step kernels, the persistent ones (which
combine layer normalisation's row statistics across their blocks) and through ``"auto"``, in training and in
evaluation. float64 against the CPU backend (itself checked against the float64 reference in
test_regularisers.py); float32 against the float64 reference fed the generator's masks; float16 and bfloat16
within twice the error of a naive PyTorch computation in the same dtype, as test_cuda.py bounds them. The
emulated build and a GPU alike (device_arrays.py); outputs NaN-poisoned (conftest.py), padded dy NaN."""

import itertools

import numpy as np
import pytest
from device_arrays import DeviceArray
from test_cuda import UNIT_ROUNDOFF, dtype_of
from test_lengths import pack_padded, poison_padding, random_lengths
from test_regularisers import (
    CELLS,
    GAIN_NAMES,
    REGULARISERS,
    SEED,
    STREAM,
    applicable,
    masks,
    problem,
    run_reference,
    split_layer_norm,
)

import conveyor

from support import assert_close

pytestmark = pytest.mark.cuda

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def gates(cell, options):
    return 3 if options.get("coupled_gates") else GATES[cell]


def run(cell, a, dtype=None, *, layer_norm=False, **options):
    """Forward and backward (when training) through the functional API: on the CPU as given (dtype None), else
    on the device in `dtype` (the cell-state arrays in its cell-state dtype, checked on the way back). Every
    output and gradient by name as float64 arrays, None where absent; the gains' gradients as dgamma_x, ..."""
    def put(name, v):
        if v is None or dtype is None:
            return v
        return DeviceArray.from_numpy(v, dtype_of(name, dtype))

    c = {k: put(k, v) for k, v in a.items() if k != "gains"}
    options = dict(seed=SEED, mask_stream=STREAM, **options)
    if layer_norm:
        options["layer_norm"] = tuple(put("gain", g) for g in a["gains"])
    if cell == "lstm":
        y, h_T, c_T, saved = conveyor.lstm_forward(c["x"], c["W"], c["R"], c["bW"], c["bR"], c["h0"], c["c0"],
                                                   P=c["P"], W_hr=c["W_hr"], **options)
        out = {"y": y, "h_T": h_T, "c_T": c_T}
        if saved is not None:
            out.update(conveyor.lstm_backward(saved, c["dy"], c["dh_T"], c["dc_T"])._asdict())
    else:
        forward = getattr(conveyor, f"{cell}_forward")
        y, h_T, saved = forward(c["x"], c["W"], c["R"], c["bW"], c["bR"], c["h0"], **options)
        out = {"y": y, "h_T": h_T}
        if saved is not None:
            out.update(getattr(conveyor, f"{cell}_backward")(saved, c["dy"], c["dh_T"])._asdict())
    out = split_layer_norm(out)
    if dtype is not None:
        for name, value in out.items():
            if value is not None:
                assert isinstance(value, DeviceArray) and value.dtype == dtype_of(name, dtype), name
    return {k: None if v is None else np.asarray(v.numpy() if dtype else v, np.float64)
            for k, v in out.items()}


def assert_same(got, expected, dtype):
    """Every result by name: None where the expectation has none, else within `dtype`'s tolerance."""
    for name, value in expected.items():
        if value is None:
            assert got.get(name) is None, name
        else:
            assert_close(name, got[name].astype(dtype), value, np.dtype(dtype))


def settings_id(cell, options, regularisers):
    settings = [f"{k}={v}" for k, v in {**options, **regularisers}.items()]
    return "-".join([cell, *settings])


# Every regulariser alone and together, for every cell it applies to (test_regularisers.py's CELLS: the LSTM
# plain, with relu, coupled gates and a forget bias, with a clip; the GRU both ways; the RNN).
SETTINGS = [(c, o, r) for (c, o), r in itertools.product(CELLS, REGULARISERS) if applicable(c, o, r)]


ALGORITHMS = ["per_step", "auto", "persistent"]


CPU_CASES = [pytest.param(c, o, r, algorithm, lengths_on,
                          id=f"{settings_id(c, o, r)}-{algorithm}-{lengths_on}")
             for c, o, r in SETTINGS for algorithm in ALGORITHMS
             for lengths_on in ("dense", "host", "device")]


def with_lengths(a, lengths_on, rng):
    """The lengths to run `a` with (None, host int64, device int32), and `a` with dy NaN past them."""
    if lengths_on == "dense":
        return None, None, a
    T, B = a["x"].shape[:2]
    lengths = random_lengths(rng, T, B)
    given = lengths if lengths_on == "host" else DeviceArray.from_numpy(lengths.astype(np.int32), "int32")
    return lengths, given, {**a, "dy": poison_padding(a["dy"], lengths)}


def assert_nothing_past_the_lengths(got, lengths):
    for b, n in enumerate(lengths):
        assert not np.any(got["y"][n:, b]), f"y: nonzero past row {b}'s length {n}"
        assert not np.any(got["dx"][n:, b]), f"dx: nonzero past row {b}'s length {n}"


@pytest.mark.parametrize(("cell", "options", "regularisers", "algorithm", "lengths_on"), CPU_CASES)
def test_training_matches_the_cpu(cell, options, regularisers, algorithm, lengths_on, rng):
    a = problem(cell, 6, 5, 4, 7, rng, G=gates(cell, options), peephole=cell == "lstm")
    lengths, given, a = with_lengths(a, lengths_on, rng)
    expected = run(cell, a, lengths=lengths, **options, **regularisers)
    got = run(cell, a, "float64", lengths=given, algorithm=algorithm, **options, **regularisers)
    if lengths is not None:
        assert_nothing_past_the_lengths(got, lengths)
    assert_same(got, expected, np.float64)


EVALUATION_SETTINGS = [(c, o, r) for c, o, r in SETTINGS
                       if c != "rnn" and ("zoneout" in r or "layer_norm" in r)]


@pytest.mark.parametrize("mode", ["inference", "backward-kept"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(("cell", "options", "regularisers"), EVALUATION_SETTINGS,
                         ids=[settings_id(*s) for s in EVALUATION_SETTINGS])
def test_evaluation_matches_the_cpu(cell, options, regularisers, algorithm, mode, rng):
    """Evaluation: zoneout's expectation and no DropConnect, without a cache (inference); or zoneout's
    expectation with a cache and a backward (the drop-in's evaluation mode when a backward is kept,
    _zoneout_sample)."""
    a = problem(cell, 5, 4, 3, 6, rng, G=gates(cell, options), peephole=cell == "lstm")
    run_options = dict(training=False) if mode == "inference" else dict(_zoneout_sample=False)
    expected = run(cell, a, **run_options, **options, **regularisers)
    got = run(cell, a, "float64", algorithm=algorithm, **run_options, **options, **regularisers)
    if mode == "inference":
        assert "dx" not in got
    assert_same(got, expected, np.float64)
    if mode == "inference" and "zoneout" in regularisers:
        plain = run(cell, a, "float64", training=False, algorithm=algorithm, **options)
        assert np.abs(plain["y"] - got["y"]).max() > 1e-3, "zoneout's expectation changed nothing: weak"


PROJECTION_SETTINGS = [(o, r) for (c, o), r in itertools.product(CELLS, REGULARISERS) if c == "lstm"]


@pytest.mark.parametrize("lengths_on", ["dense", "host", "device"])
@pytest.mark.parametrize("algorithm", ["per_step", "auto"])
@pytest.mark.parametrize("P", [3, 9], ids=["P<H", "P>H"])
@pytest.mark.parametrize(("options", "regularisers"), PROJECTION_SETTINGS,
                         ids=[settings_id("lstm", o, r) for o, r in PROJECTION_SETTINGS])
def test_with_a_projection_matches_the_cpu(options, regularisers, P, algorithm, lengths_on, rng):
    """h, y, zoneout's h and R's columns P wide, the cell and zoneout_cell H wide."""
    a = problem("lstm", 6, 5, 4, 7, rng, G=gates("lstm", options), S=P, peephole=True)
    lengths, given, a = with_lengths(a, lengths_on, rng)
    expected = run("lstm", a, lengths=lengths, **options, **regularisers)
    assert expected["dW_hr"] is not None
    got = run("lstm", a, "float64", lengths=given, algorithm=algorithm, **options, **regularisers)
    if lengths is not None:
        assert_nothing_past_the_lengths(got, lengths)
    assert_same(got, expected, np.float64)


@pytest.mark.parametrize("algorithm", ["per_step", "auto"])
def test_packed_arrays_match_the_cpu(algorithm, rng):
    """ForwardArgs::packed (x, y, dy, dx as a PackedSequence's data), every regulariser, a projection."""
    T, B, P = 6, 7, 4
    a = problem("lstm", T, B, 5, 9, rng, S=P, peephole=True)
    lengths = np.sort(random_lengths(rng, T, B))[::-1].copy()
    a["x"], a["dy"] = pack_padded(a["x"], lengths), pack_padded(a["dy"], lengths)
    regularisers = dict(REGULARISERS[-1], variational=False)
    expected = run("lstm", a, lengths=lengths, _packed=True, **regularisers)
    assert expected["y"].shape == (lengths.sum(), P)
    got = run("lstm", a, "float64", lengths=lengths, _packed=True, algorithm=algorithm, **regularisers)
    assert_same(got, expected, np.float64)


# float32 against the float64 reference: without the clip, where float32 could land on the other side of its
# bound than float64 (the float64 comparisons above cover it).
REFERENCE_SETTINGS = [(c, o, r) for c, o, r in SETTINGS if not o.get("cell_clip")]
SHAPES = [(6, 3, 5, 7), (5, 17, 9, 33)]  # (T, B, I, H): the second across the step tiles of 16 rows, 32 units


def reference_cases():
    for c, o, r in REFERENCE_SETTINGS:
        for shape in SHAPES:
            if shape != SHAPES[0] and r not in (REGULARISERS[3], REGULARISERS[-1]):
                continue  # the larger shape: layer normalisation, alone and with everything
            for algorithm in ALGORITHMS:
                yield pytest.param(c, o, r, shape, algorithm,
                                   id="{}-T{}-B{}-I{}-H{}-{}".format(settings_id(c, o, r), *shape, algorithm))


@pytest.mark.parametrize(("cell", "options", "regularisers", "shape", "algorithm"), list(reference_cases()))
def test_float32_matches_the_reference(cell, options, regularisers, shape, algorithm, rng):
    T, B, I, H = shape
    G = gates(cell, options)
    a = problem(cell, T, B, I, H, rng, G=G, peephole=cell == "lstm")
    layer_norm = regularisers.get("layer_norm", False)
    mask_options = {k: v for k, v in regularisers.items() if k != "layer_norm"}
    reference_masks = masks(cell, T, B, G, H, H, **mask_options)
    expected = run_reference(cell, a, reference_masks, layer_norm=layer_norm, **options)
    got = run(cell, a, "float32", algorithm=algorithm, **options, **regularisers)
    assert_same(got, expected, np.float32)


@pytest.mark.parametrize("algorithm", ["per_step", "auto"])
@pytest.mark.parametrize("P", [3, 9], ids=["P<H", "P>H"])
@pytest.mark.parametrize("regularisers", REGULARISERS,
                         ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()))
def test_float32_with_a_projection_matches_the_reference(regularisers, P, algorithm, rng):
    T, B, I, H = 5, 4, 6, 7
    a = problem("lstm", T, B, I, H, rng, S=P, peephole=True)
    layer_norm = regularisers.get("layer_norm", False)
    mask_options = {k: v for k, v in regularisers.items() if k != "layer_norm"}
    expected = run_reference("lstm", a, masks("lstm", T, B, 4, H, P, **mask_options), layer_norm=layer_norm)
    assert_same(run("lstm", a, "float32", algorithm=algorithm, **regularisers), expected, np.float32)


@pytest.mark.parametrize("units", [4, 8, 16])
@pytest.mark.parametrize(("cell", "options"),
                         [("lstm", {}), ("lstm", dict(coupled_gates=True)), ("gru", dict(reset_after=True))],
                         ids=["lstm", "lstm-coupled", "gru"])
def test_persistent_layer_norm_at_every_units_per_block(cell, options, units, monkeypatch, rng):
    """The persistent kernels combine each block's part of a row's statistics and sums: at H = 37 with 4, 8
    and 16 units a block (the last block's partly past H), B = 19 in two passes of 16 rows, float32 against
    the reference."""
    monkeypatch.setenv("CONVEYOR_PERSISTENT_UNITS", str(units))
    T, B, I, H = 5, 19, 6, 37
    G = gates(cell, options)
    a = problem(cell, T, B, I, H, rng, G=G, peephole=cell == "lstm")
    regularisers = dict(layer_norm=True, zoneout=0.2, recurrent_dropout=0.3, variational=True)
    mask_options = {k: v for k, v in regularisers.items() if k != "layer_norm"}
    expected = run_reference(cell, a, masks(cell, T, B, G, H, H, **mask_options), layer_norm=True, **options)
    got = run(cell, a, "float32", algorithm="persistent", **options, **regularisers)
    assert_same(got, expected, np.float32)


def test_auto_runs_layer_norm_on_the_persistent_kernels(rng):
    """B <= 32, where 'auto' takes the persistent kernels: with layer normalisation too, bit for bit as
    'persistent' forced, and apart from the per-step kernels' results by rounding only (their statistics are
    summed in another order)."""
    for cell in ("lstm", "gru"):
        a = problem(cell, 4, 3, 5, 6, rng)
        auto = run(cell, a, "float32", layer_norm=True, zoneout=0.2, algorithm="auto")
        persistent = run(cell, a, "float32", layer_norm=True, zoneout=0.2, algorithm="persistent")
        per_step = run(cell, a, "float32", layer_norm=True, zoneout=0.2, algorithm="per_step")
        for name, value in persistent.items():
            if value is not None:
                np.testing.assert_array_equal(auto[name], value, err_msg=f"{cell}: {name}")
                assert_close(name, value.astype(np.float32), per_step[name], np.dtype(np.float32))
        assert np.any(persistent["y"] != per_step["y"]) or np.any(persistent["dR"] != per_step["dR"]), \
            f"{cell}: the persistent results equal the per-step ones bit for bit: did 'persistent' run?"


@pytest.mark.parametrize(("cell", "regularisers", "algorithm"), [
    ("lstm", dict(REGULARISERS[-1]), "per_step"),
    ("gru", dict(layer_norm=True, weight_dropout=0.2, zoneout=0.15), "per_step"),
    ("lstm", dict(REGULARISERS[-1]), "persistent"),
    ("gru", dict(layer_norm=True, weight_dropout=0.2, zoneout=0.15), "persistent"),
])
def test_two_runs_agree_bit_for_bit(cell, regularisers, algorithm, rng):
    """Deterministic kernels: the row kernels and the persistent kernels' combination of the blocks' parts sum
    in a fixed order (the emulator runs the threads of the two calls in different orders)."""
    a = problem(cell, 5, 19, 12, 37, rng)
    first = run(cell, a, "float32", algorithm=algorithm, **regularisers)
    second = run(cell, a, "float32", algorithm=algorithm, **regularisers)
    for name, value in first.items():
        if value is not None:
            np.testing.assert_array_equal(second[name], value, err_msg=name)


def naive_torch(cell, a, reference_masks, dtype, layer_norm):
    """The window in PyTorch's ops in `dtype` (on the GPU where PyTorch has one), with the masks the reference
    takes, autograd for the gradients: what a naive computation in that dtype gets. The LSTM and the GRU with
    reset_after, tanh, no peepholes."""
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype)
    where = "cuda" if torch.cuda.is_available() else "cpu"

    def tensor(v, grad=False):
        return torch.tensor(v, dtype=dt, device=where, requires_grad=grad)

    lstm = cell == "lstm"
    names = ["x", "W", "R", "bW", "bR", "h0"] + (["c0"] if lstm else [])
    leaves = {n: tensor(a[n], True) for n in names}
    gains = dict(zip(GAIN_NAMES, (tensor(g, True) for g in a["gains"]))) if layer_norm else {}
    x, W, R, bW, bR, h = (leaves[n] for n in names[:6])
    c = leaves.get("c0")
    m = {k: tensor(v) for k, v in reference_masks.items()}
    R_used = R * m["weight_mask"] if "weight_mask" in m else R
    H = a["W"].shape[0] // (4 if lstm else 3)

    def norm(v, gamma, beta=None):
        mean = v.mean(-1, keepdim=True)
        centred = v - mean
        out = gamma * centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + 1e-5)
        return out if beta is None else out + beta

    def zone_out(name, t, previous, new):
        return new if name not in m else m[name][t] * previous + (1 - m[name][t]) * new

    ys = []
    for t in range(x.shape[0]):
        h_product = h * m["recurrent_mask"][t] if "recurrent_mask" in m else h
        ax, ar = x[t] @ W.t(), h_product @ R_used.t()
        if layer_norm:
            ax, ar = norm(ax, gains["gamma_x"]), norm(ar, gains["gamma_h"])
        ax, ar = ax + bW, ar + bR
        if lstm:
            i, f, g, o = (ax[:, k * H:(k + 1) * H] + ar[:, k * H:(k + 1) * H] for k in range(4))
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            shown = norm(c_new, gains["gamma_c"], gains["beta_c"]) if layer_norm else c_new
            h_new = torch.sigmoid(o) * torch.tanh(shown)
            c = zone_out("zoneout_cell", t, c, c_new)
        else:
            r = torch.sigmoid(ax[:, :H] + ar[:, :H])
            z = torch.sigmoid(ax[:, H:2 * H] + ar[:, H:2 * H])
            n = torch.tanh(ax[:, 2 * H:] + r * ar[:, 2 * H:])
            h_new = (1 - z) * n + z * h
        h = zone_out("zoneout", t, h, h_new)
        ys.append(h)
    y = torch.stack(ys)
    loss = (y * tensor(a["dy"])).sum() + (h * tensor(a["dh_T"])).sum()
    if lstm:
        loss = loss + (c * tensor(a["dc_T"])).sum()
    wrt = [leaves[n] for n in names] + list(gains.values())
    grads = torch.autograd.grad(loss, wrt)
    results = {"y": y, "h_T": h, **({"c_T": c} if lstm else {})}
    results.update(zip([f"d{n}" for n in names] + [f"d{n}" for n in gains], grads))
    return {k: v.detach().to(torch.float64).cpu().numpy() for k, v in results.items()}


def clear_of_saturation(a):
    """`a` with the gains of LN(W x_t) and LN(R h_{t-1}) scaled by 0.4. Normalised, the pre-activations spread
    over a few units whatever the weights, and gains near 1 take some gates to where their sigmoid is within a
    16-bit unit of 0 or 1. There the backward's s (1 - s), from the 16-bit s that a cache (or PyTorch's
    autograd) keeps, loses most of its digits; such units make the largest errors of both computations, and
    the comparison of their maxima becomes a toss-up (as a flip at a ReLU's kink does: clear_of_the_relu_kink
    in test_cuda.py)."""
    gamma_x, gamma_h, *rest = a["gains"]
    return {**a, "gains": (0.4 * gamma_x, 0.4 * gamma_h, *rest)}


@pytest.mark.parametrize("algorithm", ["per_step", "auto"])
@pytest.mark.parametrize("regularisers",
                         [REGULARISERS[-1], dict(weight_dropout=0.2, zoneout=0.15, zoneout_cell=0.3)],
                         ids=["all", "dropconnect-zoneout"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_within_twice_the_naive_error(dtype, cell, regularisers, algorithm, rng):
    """'auto' runs the persistent kernels here (B <= 32)."""
    regularisers = dict(regularisers)
    if cell == "gru":
        regularisers.pop("zoneout_cell", None)
    T, B, I, H = 6, 5, 24, 40
    G = GATES[cell]
    a = clear_of_saturation(problem(cell, T, B, I, H, rng))
    layer_norm = regularisers.get("layer_norm", False)
    mask_options = {k: v for k, v in regularisers.items() if k != "layer_norm"}
    reference_masks = masks(cell, T, B, G, H, H, **mask_options)
    exact = run_reference(cell, a, reference_masks, layer_norm=layer_norm)
    got = run(cell, a, dtype, algorithm=algorithm, **regularisers)
    naive = naive_torch(cell, a, reference_masks, dtype, layer_norm)
    for name, value in exact.items():
        if value is None:
            assert got[name] is None, name
            continue
        assert np.all(np.isfinite(got[name])), f"{name}: non-finite elements"
        ours = np.max(np.abs(got[name] - value))
        bound = 2 * np.max(np.abs(naive[name] - value)) + UNIT_ROUNDOFF[dtype] * np.max(np.abs(value))
        assert ours <= bound, (f"{name}: max error {ours:.3g} > bound {bound:.3g} "
                               f"(twice the naive {dtype} error)")
