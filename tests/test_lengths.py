"""Variable-length batches (docs/math.md, "Variable lengths"): ``lengths=`` on the functional API, the stacks
and the layers of the CPU backend, against the float64 reference run row by row on each row's own steps
(a reference that knows nothing of packing); padded dy is NaN in every test, so a read of it shows. Also
finite differences on Conveyor itself, the rows' independence, and the errors."""

import numpy as np
import pytest

import conveyor
from conveyor import _stack

import reference as ref
from support import CONFIGS, GATES, Problem, assert_close, config_id, make_problem, run_reference

SHAPES = [  # (T, B, I, H)
    (1, 1, 3, 5),
    (1, 3, 2, 4),
    (5, 4, 3, 7),
    (9, 6, 5, 13),
    (7, 17, 40, 70),  # 17 rows: the packed GEMM path while many rows run, the one- and two-row path after
]


def random_lengths(rng, T, B):
    """Lengths in [1, T] in random order, with 1 and T among them when B allows."""
    lengths = rng.integers(1, T + 1, size=B)
    if B >= 2:
        lengths[:2] = (1, T)
    return rng.permutation(lengths)


def poison_padding(a, lengths):
    """a [T, B, ...] with NaN at every step past its row's length: what Conveyor must never read."""
    a = a.copy()
    for b, n in enumerate(lengths):
        a[n:, b] = np.nan
    return a


def states(p):
    return (p.h0, p.c0) if p.cell == "lstm" else (p.h0,)


def finals(p):
    return (p.dh_T, p.dc_T) if p.cell == "lstm" else (p.dh_T,)


def run_with_lengths(p, lengths, **options):
    """Forward and backward through Conveyor's functional API: (y, h_T, c_T or None, grads as a dict)."""
    forward = getattr(conveyor, f"{p.cell}_forward")
    backward = getattr(conveyor, f"{p.cell}_backward")
    out = forward(p.x, p.W, p.R, p.bW, p.bR, *states(p), lengths=lengths, **p.options, **options)
    grads = backward(out[-1], p.dy, *finals(p))._asdict()
    grads.pop("dP", None)
    grads.pop("dW_hr", None)
    grads.pop("dlayer_norm", None)
    return out[0], out[1], out[2] if p.cell == "lstm" else None, grads


def row(p, b, n):
    """Row b's first n steps as a problem of its own."""
    def take(a, steps=True):
        if a is None:
            return None
        return a[:n, b:b + 1] if steps else a[b:b + 1]

    return Problem(p.cell, p.options, take(p.x), p.W, p.R, p.bW, p.bR, take(p.h0, False), take(p.c0, False),
                   take(p.dy), take(p.dh_T, False), take(p.dc_T, False))


def reference_with_lengths(p, lengths):
    """The float64 reference, each row run alone on its own steps: y and dx zero past them, the parameter
    gradients summed over the rows."""
    T, B = p.x.shape[:2]
    H = p.R.shape[1]
    y, dx = np.zeros((T, B, H)), np.zeros_like(p.x)
    h_T, c_T = np.zeros((B, H)), np.zeros((B, H))
    grads = {}
    for b, n in enumerate(lengths):
        ry, rh, rc, rg = run_reference(row(p, b, n))
        y[:n, b], h_T[b] = ry[:, 0], rh[0]
        if p.cell == "lstm":
            c_T[b] = rc[0]
        dx[:n, b] = rg.pop("dx")[:, 0]
        for name, value in rg.items():
            if name in ("dh0", "dc0"):
                grads.setdefault(name, np.zeros((B, H)))[b] = value[0]
            elif value is not None:
                grads[name] = grads.get(name, 0) + value
            else:
                grads[name] = None
    grads["dx"] = dx
    return y, h_T, c_T if p.cell == "lstm" else None, grads


def assert_matches(got, expected, dtype, lengths):
    y, h_T, c_T, grads = got
    ry, rh_T, rc_T, rgrads = expected
    for b, n in enumerate(lengths):  # exactly zero, not merely small, past each row's length
        assert not np.any(y[n:, b]), f"y: nonzero past row {b}'s length {n}"
        assert not np.any(grads["dx"][n:, b]), f"dx: nonzero past row {b}'s length {n}"
    assert_close("y", y, ry, dtype)
    assert_close("h_T", h_T, rh_T, dtype)
    if c_T is not None:
        assert_close("c_T", c_T, rc_T, dtype)
    assert set(grads) == set(rgrads)
    for name, value in rgrads.items():
        if value is None:
            assert grads[name] is None, name
        else:
            assert_close(name, grads[name], value, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_reference_row_by_row(config, shape, dtype, rng):
    p = make_problem(*config, *shape, rng)
    lengths = random_lengths(rng, shape[0], shape[1])
    p.dy = poison_padding(p.dy, lengths)
    got = run_with_lengths(p.cast(dtype), lengths)
    assert_matches(got, reference_with_lengths(p, lengths), dtype, lengths)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("variant", ["no-initial-state", "no-bias", "no-final-grads"])
def test_optional_arguments(config, variant, rng):
    p = make_problem(*config, 6, 5, 4, 6, rng, initial_state=variant != "no-initial-state",
                     bias=variant != "no-bias", final_grads=variant != "no-final-grads")
    lengths = random_lengths(rng, 6, 5)
    p.dy = poison_padding(p.dy, lengths)
    assert_matches(run_with_lengths(p, lengths), reference_with_lengths(p, lengths), np.float64, lengths)


LSTM_VARIANTS = {
    "peephole": {"peephole": True},
    "coupled-peephole": {"peephole": True, "coupled_gates": True},
    "forget-bias-clip": {"forget_bias": 1.0, "cell_clip": 0.3},
}


@pytest.mark.parametrize("variant", LSTM_VARIANTS, ids=list(LSTM_VARIANTS))
def test_lstm_options(variant, rng):
    """Peepholes (and their gradient), coupled gates, the forget bias and the clip with lengths."""
    options = dict(LSTM_VARIANTS[variant])
    T, B, I, H = 7, 5, 4, 6
    coupled = options.get("coupled_gates", False)
    p = make_problem("lstm", {}, T, B, I, H, rng)
    if coupled:
        p.W, p.R, p.bW, p.bR = p.W[H:], p.R[H:], p.bW[H:], p.bR[H:]
    P = rng.uniform(-0.5, 0.5, (3, H)) if options.pop("peephole", False) else None
    lengths = random_lengths(rng, T, B)
    dy = poison_padding(p.dy, lengths)
    y, h_T, c_T, saved = conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0, P=P, lengths=lengths,
                                               **options)
    g = conveyor.lstm_backward(saved, dy, p.dh_T, p.dc_T)
    ref_options = {"peephole": P, "coupled_gates": coupled, "forget_bias": options.get("forget_bias", 0.0),
                   "cell_clip": options.get("cell_clip")}
    dP = np.zeros((3, H)) if P is not None else None
    dW = 0
    for b, n in enumerate(lengths):
        ry, rh, rc, cache = ref.lstm_forward(p.x[:n, b:b + 1], p.W, p.R, p.bW, p.bR, p.h0[b:b + 1],
                                             p.c0[b:b + 1], **ref_options)
        rg = ref.lstm_backward(cache, p.dy[:n, b:b + 1], p.dh_T[b:b + 1], p.dc_T[b:b + 1])
        assert_close("y", y[:n, b], ry[:, 0], np.float64)
        assert_close("c_T", c_T[b], rc[0], np.float64)
        assert_close("dx", g.dx[:n, b], rg[0][:, 0], np.float64)
        assert_close("dc0", g.dc0[b], rg[2][0], np.float64)
        dW = dW + rg[3]
        if P is not None:
            dP += rg[7]
    assert_close("dW", g.dW, dW, np.float64)
    if P is not None:
        assert_close("dP", g.dP, dP, np.float64)


@pytest.mark.parametrize("variational", [True, False], ids=["variational", "per-step-masks"])
@pytest.mark.parametrize("config", CONFIGS[::2], ids=config_id)
def test_recurrent_dropout(config, variational, rng):
    """Each row draws the masks of its own batch row and steps: the reference, row by row, with the slices of
    the padded window's masks."""
    T, B, I, H = 6, 5, 3, 6
    p = make_problem(*config, T, B, I, H, rng)
    lengths = random_lengths(rng, T, B)
    dropout = {"recurrent_dropout": 0.4, "variational": variational, "seed": 11, "mask_stream": 3}
    masks = conveyor.dropout_mask(p.x, (T, B, H), 0.4, variational=variational, seed=11, mask_stream=3)
    p.dy = poison_padding(p.dy, lengths)
    y, h_T, c_T, grads = run_with_lengths(p, lengths, **dropout)
    for b, n in enumerate(lengths):
        q = row(p, b, n)
        q.options = {**q.options, "recurrent_mask": masks[:n, b:b + 1]}
        ry, rh, _, rg = run_reference(q)
        assert_close("y", y[:n, b], ry[:, 0], np.float64)
        assert_close("h_T", h_T[b], rh[0], np.float64)
        assert_close("dx", grads["dx"][:n, b], rg["dx"][:, 0], np.float64)
        assert_close("dh0", grads["dh0"][b], rg["dh0"][0], np.float64)


@pytest.mark.parametrize("config", CONFIGS[::2], ids=config_id)
def test_finite_differences(config, rng):
    """Conveyor's own gradients with lengths against central differences of its own forward, float64."""
    cell = config[0]
    T, B, I, H = 4, 3, 2, 3
    p = make_problem(*config, T, B, I, H, rng)
    lengths = np.array([2, 4, 1])
    forward = getattr(conveyor, f"{cell}_forward")
    backward = getattr(conveyor, f"{cell}_backward")

    def loss(x, W, h0):
        out = forward(x, W, p.R, p.bW, p.bR, h0, *states(p)[1:], lengths=lengths, training=False, **p.options)
        total = np.sum(out[0] * np.nan_to_num(p.dy)) + np.sum(out[1] * p.dh_T)
        return total + (np.sum(out[2] * p.dc_T) if cell == "lstm" else 0.0)

    out = forward(p.x, p.W, p.R, p.bW, p.bR, *states(p), lengths=lengths, **p.options)
    g = backward(out[-1], p.dy, *finals(p))
    for name, value, grad in (("x", p.x, g.dx), ("W", p.W, g.dW), ("h0", p.h0, g.dh0)):
        numeric = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            step = np.zeros_like(value)
            step[i] = 1e-6
            args = {"x": p.x, "W": p.W, "h0": p.h0}
            plus = loss(**{**args, name: value + step})
            minus = loss(**{**args, name: value - step})
            numeric[i] = (plus - minus) / 2e-6
        np.testing.assert_allclose(grad, numeric, atol=1e-7, rtol=1e-6, err_msg=name)


def test_full_lengths_equal_no_lengths_bit_for_bit(rng):
    for cell, options in CONFIGS[::2]:
        p = make_problem(cell, options, 5, 4, 3, 6, rng).cast(np.float32)
        full = run_with_lengths(p, np.full(4, 5))
        none = run_with_lengths(p, None)
        pairs = [*zip(full[:3], none[:3]), *((full[3][name], none[3][name]) for name in none[3])]
        for a, b in pairs:
            assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[0] != "rnn"], ids=config_id)  # RNN: no cache
def test_padded_steps_are_never_computed(config, poison_outputs, rng):
    """The window's cache holds sum(lengths) rows: with outputs poisoned, every row past them is still NaN,
    so no step past a row's length ran its cell (nor, since the products write the rows they run, its
    recurrent product); the rows before them are all written."""
    T, B = 8, 6
    p = make_problem(*config, T, B, 4, 5, rng)
    lengths = random_lengths(rng, T, B)
    out = getattr(conveyor, f"{config[0]}_forward")(p.x, p.W, p.R, p.bW, p.bR, *states(p), lengths=lengths,
                                                    **p.options)
    cache = out[-1].cache.reshape(T * B, -1)
    tokens = int(lengths.sum())
    assert np.all(np.isfinite(cache[:tokens]))
    assert np.all(np.isnan(cache[tokens:]))


@pytest.mark.parametrize("lengths, error, message", [
    ([0, 2, 3], ValueError, r"lengths: expected every length in \[1, T\] = \[1, 4\], got lengths\[0\] = 0"),
    ([1, 5, 3], ValueError, r"lengths\[1\] = 5"),
    ([1, -2, 3], ValueError, r"lengths\[1\] = -2"),
    ([1, 2], ValueError, r"lengths: expected shape \(3,\) \[B\], got \(2,\)"),
    ([[1, 2, 3]], ValueError, r"lengths: expected shape \(3,\) \[B\], got \(1, 3\)"),
    ([1.0, 2.0, 3.0], TypeError, r"lengths: expected an int32 or int64 array, got dtype float64"),
    (["a", "b", "c"], TypeError, r"lengths: expected an int32 or int64 array"),
])
def test_bad_lengths_are_named(lengths, error, message, rng):
    p = make_problem("lstm", {}, 4, 3, 2, 3, rng)
    with pytest.raises(error, match=message):
        conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, lengths=lengths)


# ------------------------------------------------------------------------------------------ stacks, layers


def stack_problem(cell, rng, T=6, B=5, I=3, H=4, layers=2, directions=2):
    G = GATES[cell]
    weights = []
    for k in range(layers * directions):
        n_in = I if k < directions else directions * H
        weights.append((rng.uniform(-0.5, 0.5, (G * H, n_in)), rng.uniform(-0.5, 0.5, (G * H, H)),
                        rng.uniform(-0.5, 0.5, G * H), rng.uniform(-0.5, 0.5, G * H)))
    x = rng.uniform(-1, 1, (T, B, I))
    h0 = rng.uniform(-0.5, 0.5, (layers * directions, B, H))
    c0 = rng.uniform(-0.5, 0.5, (layers * directions, B, H)) if cell == "lstm" else None
    return x, weights, h0, c0


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_bidirectional_stack_runs_each_row_alone(cell, rng):
    """A 2-layer bidirectional stack with lengths: each row's outputs, final states and input gradient are
    those of the row run alone on its own steps (the reverse direction starting at its last step), and the
    weight gradients their sum."""
    x, weights, h0, c0 = stack_problem(cell, rng)
    T, B = x.shape[:2]
    lengths = random_lengths(rng, T, B)
    dy = poison_padding(rng.uniform(-1, 1, (T, B, 8)), lengths)
    dh_n = rng.uniform(-1, 1, h0.shape)
    dc_n = rng.uniform(-1, 1, h0.shape) if cell == "lstm" else None
    kwargs = {"num_layers": 2, "bidirectional": True}
    y, h_n, c_n, saved = _stack.stack_forward(cell, x, weights, h0, c0, lengths=lengths, **kwargs)
    g = _stack.stack_backward(saved, dy, dh_n, dc_n)
    dW = [0] * len(weights)
    for b, n in enumerate(lengths):
        def alone(a, steps=None, b=b):
            return None if a is None else np.ascontiguousarray(a[:steps, b:b + 1])

        ry, rh, rc, rs = _stack.stack_forward(cell, alone(x, n), weights, alone(h0), alone(c0), **kwargs)
        rg = _stack.stack_backward(rs, alone(dy, n), alone(dh_n), alone(dc_n))
        assert_close("y", y[:n, b], ry[:, 0], np.float64)
        assert not np.any(y[n:, b]) and not np.any(g.dx[n:, b])
        assert_close("h_n", h_n[:, b], rh[:, 0], np.float64)
        if cell == "lstm":
            assert_close("c_n", c_n[:, b], rc[:, 0], np.float64)
            assert_close("dc0", g.dc0[:, b], rg.dc0[:, 0], np.float64)
        assert_close("dx", g.dx[:n, b], rg.dx[:, 0], np.float64)
        assert_close("dh0", g.dh0[:, b], rg.dh0[:, 0], np.float64)
        dW = [acc + w.dW for acc, w in zip(dW, rg.weights)]
    for k, w in enumerate(g.weights):
        assert_close(f"dW[{k}]", w.dW, dW[k], np.float64)


def test_stack_dropout_with_lengths_is_deterministic_and_zero_past_lengths(rng):
    x, weights, h0, c0 = stack_problem("lstm", rng)
    lengths = random_lengths(rng, *x.shape[:2])
    kwargs = {"num_layers": 2, "bidirectional": True, "dropout": 0.3, "recurrent_dropout": 0.2, "seed": 5,
              "lengths": lengths}
    y1 = _stack.stack_forward("lstm", x, weights, h0, c0, **kwargs)[0]
    y2 = _stack.stack_forward("lstm", x, weights, h0, c0, **kwargs)[0]
    assert np.array_equal(y1, y2)
    for b, n in enumerate(lengths):
        assert not np.any(y1[n:, b])


@pytest.mark.parametrize("layer_type", ["LSTM", "GRU", "RNN"])
def test_layers_take_lengths(layer_type, rng):
    layer = getattr(conveyor, layer_type)(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=1)
    x = rng.uniform(-1, 1, (6, 5, 3))
    lengths = random_lengths(rng, 6, 5)
    out = layer.forward(x, lengths=lengths)
    weights = layer._weights()
    expected = _stack.stack_forward(layer._cell, x, weights, num_layers=2, bidirectional=True,
                                    lengths=lengths, training=False, **layer._cell_options)
    assert np.array_equal(out[0], expected[0]) and np.array_equal(out[1], expected[1])
    dx = layer.backward(poison_padding(rng.uniform(-1, 1, out[0].shape), lengths))[0]
    for b, n in enumerate(lengths):
        assert not np.any(dx[n:, b]) and np.all(np.isfinite(dx[:n, b]))
    assert all(np.all(np.isfinite(g)) for g in layer.grads.values())


# ------------------------------------------------------------------------------------ packed arrays (C++ API)


def pack_padded(a, lengths):
    """A padded [T, B, ...] array's rows as a PackedSequence lays them out (lengths non-increasing):
    step t's rows, those longer than t, after step t-1's."""
    return np.ascontiguousarray(np.concatenate([a[t, :int((lengths > t).sum())] for t in range(lengths[0])]))


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_packed_arrays_equal_the_padded_path(config, rng):
    """_packed=True (ForwardArgs::packed: x, y, dy and dx given packed, as the drop-in passes a
    PackedSequence's data): the same numbers as the padded arrays with the same (sorted) lengths."""
    T, B = 7, 5
    p = make_problem(*config, T, B, 4, 6, rng)
    lengths = np.sort(random_lengths(rng, T - 1, B))[::-1].copy()  # the padded window has a step more
    dropout = {"recurrent_dropout": 0.3, "variational": False, "seed": 4}
    padded = run_with_lengths(p, lengths, **dropout)
    forward = getattr(conveyor, f"{p.cell}_forward")
    backward = getattr(conveyor, f"{p.cell}_backward")
    out = forward(pack_padded(p.x, lengths), p.W, p.R, p.bW, p.bR, *states(p), lengths=lengths, _packed=True,
                  **p.options, **dropout)
    grads = backward(out[-1], pack_padded(p.dy, lengths), *finals(p))
    np.testing.assert_array_equal(out[0], pack_padded(padded[0], lengths))
    np.testing.assert_array_equal(out[1], padded[1])
    np.testing.assert_array_equal(grads.dx, pack_padded(padded[3]["dx"], lengths))
    for name in ("dh0", "dW", "dR", "dbW", "dbR"):
        np.testing.assert_array_equal(getattr(grads, name), padded[3][name], err_msg=name)


@pytest.mark.parametrize("lengths, error, message", [
    ([2, 3, 1], ValueError, r"lengths: packed arrays need lengths >= 1 in non-increasing order \(the rows "
                            r"sorted longest first\), got lengths\[1\] = 3 after 2"),
    ([3, 2, 2], ValueError, r"x: expected sum\(lengths\) = 7 rows \(packed\), got shape \(6, 2\)"),
    (None, ValueError, r"lengths: packed arrays need the lengths of their rows, got none"),
])
def test_bad_packed_arrays_are_named(lengths, error, message, rng):
    p = make_problem("gru", {}, 3, 3, 2, 3, rng)
    with pytest.raises(error, match=message):
        conveyor.gru_forward(rng.uniform(-1, 1, (6, 2)), p.W, p.R, p.bW, p.bR, lengths=lengths, _packed=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_bidirectional_stack_with_dropout_equals_the_padded_one(cell, rng):
    x, weights, h0, c0 = stack_problem(cell, rng)
    T, B = x.shape[:2]
    lengths = np.sort(random_lengths(rng, T, B))[::-1].copy()
    kwargs = {"num_layers": 2, "bidirectional": True, "dropout": 0.3, "recurrent_dropout": 0.2, "seed": 9}
    y, h_n, c_n, saved = _stack.stack_forward(cell, x, weights, h0, c0, lengths=lengths, **kwargs)
    dy = rng.uniform(-1, 1, y.shape)
    g = _stack.stack_backward(saved, dy)
    py, ph_n, pc_n, psaved = _stack.stack_forward(cell, pack_padded(x, lengths), weights, h0, c0,
                                                  lengths=lengths, _packed=True, **kwargs)
    pg = _stack.stack_backward(psaved, pack_padded(dy, lengths))
    np.testing.assert_allclose(py, pack_padded(y, lengths), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ph_n, h_n, rtol=1e-13, atol=1e-15)
    if cell == "lstm":
        np.testing.assert_allclose(pc_n, c_n, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(pg.dx, pack_padded(g.dx, lengths), rtol=1e-12, atol=1e-14)
    for k, (a, b) in enumerate(zip(pg.weights, g.weights)):
        np.testing.assert_allclose(a.dW, b.dW, rtol=1e-12, atol=1e-14, err_msg=f"dW[{k}]")
