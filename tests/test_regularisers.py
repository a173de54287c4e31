"""The regularisers that cuDNN lacks, on the CPU backend: layer normalisation (``layer_norm``, the LSTM and
the GRU with reset_after), DropConnect on R (``weight_dropout``, every cell) and zoneout (``zoneout`` for the
LSTM and the GRU, ``zoneout_cell`` for the LSTM's c), alone and together, with recurrent dropout, every LSTM
option, the projection and variable lengths, against the float64 reference fed the masks of the counter-based
generator; evaluation mode (zoneout's expectation, no DropConnect); Conveyor's own gradients against finite
differences; the refusals."""

import itertools

import numpy as np
import pytest

import conveyor

import reference as ref
from support import assert_close

SEED, STREAM = 1234, 40


def masks(cell, T, B, G, H, S, *, training=True, weight_dropout=0.0, zoneout=0.0, zoneout_cell=0.0,
          recurrent_dropout=0.0, variational=True):
    """The reference's keyword arguments for the masks Conveyor draws from (SEED, STREAM): the recurrent
    dropout mask (stream STREAM), DropConnect's M (STREAM + 1), zoneout's keep factors of h (STREAM + 2) and
    c (STREAM + 3); in evaluation, zoneout's expectation and nothing else."""
    out = {}
    if training and recurrent_dropout:
        out["recurrent_mask"] = ref.dropout_mask(recurrent_dropout, variational, SEED, STREAM, (T, B, S))
    if training and weight_dropout:
        out["weight_mask"] = ref.dropout_mask(weight_dropout, True, SEED, STREAM + 1, (1, G * H, S))[0]
    zoneouts = (("zoneout", zoneout, STREAM + 2, S), ("zoneout_cell", zoneout_cell, STREAM + 3, H))
    for name, z, stream, units in zoneouts:
        if z and training:
            out[name] = (ref.dropout_mask(z, False, SEED, stream, (T, B, units)) == 0).astype(np.float64)
        elif z:
            out[name] = np.full((T, B, units), z)
    return out


def problem(cell, T, B, I, H, rng, *, G=None, S=None, peephole=False):
    """Random float64 inputs and upstream gradients; `gains` are layer-norm gains around their initial values
    (used by the runs with layer_norm)."""
    G = G or {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    S = S or H
    w = 1.0 / np.sqrt(H)

    def u(*shape, s=1.0):
        return rng.uniform(-s, s, size=shape)

    a = dict(x=u(T, B, I), W=u(G * H, I, s=w), R=u(G * H, S, s=w), bW=u(G * H, s=w), bR=u(G * H, s=w),
             h0=u(B, S, s=0.5), dy=u(T, B, S), dh_T=u(B, S))
    a["gains"] = (1 + u(G * H, s=0.3), 1 + u(G * H, s=0.3))
    if cell == "lstm":
        a["gains"] += (1 + u(H, s=0.3), u(H, s=0.3))
    if cell == "lstm":
        a.update(c0=u(B, H, s=0.5), dc_T=u(B, H), P=u(3, H, s=0.5) if peephole else None,
                 W_hr=u(S, H, s=w) if S != H else None)
    return a


def run_conveyor(cell, a, dtype=np.float64, layer_norm=False, **options):
    """Forward and backward (when training) through the functional API: outputs and gradients by name."""
    c = {k: None if v is None else np.ascontiguousarray(v, dtype=dtype) for k, v in a.items() if k != "gains"}
    options = dict(seed=SEED, mask_stream=STREAM, **options)
    if layer_norm:
        options["layer_norm"] = tuple(np.ascontiguousarray(g, dtype=dtype) for g in a["gains"])
    if cell == "lstm":
        y, h_T, c_T, saved = conveyor.lstm_forward(c["x"], c["W"], c["R"], c["bW"], c["bR"], c["h0"], c["c0"],
                                                   P=c["P"], W_hr=c["W_hr"], **options)
        out = {"y": y, "h_T": h_T, "c_T": c_T}
        if saved is not None:
            out.update(conveyor.lstm_backward(saved, c["dy"], c["dh_T"], c["dc_T"])._asdict())
        return split_layer_norm(out)
    y, h_T, saved = getattr(conveyor, f"{cell}_forward")(c["x"], c["W"], c["R"], c["bW"], c["bR"], c["h0"],
                                                          **options)
    out = {"y": y, "h_T": h_T}
    if saved is not None:
        out.update(getattr(conveyor, f"{cell}_backward")(saved, c["dy"], c["dh_T"])._asdict())
    return split_layer_norm(out)


GAIN_NAMES = ("gamma_x", "gamma_h", "gamma_c", "beta_c")


def split_layer_norm(out):
    """The gains' gradients under their own names (dgamma_x, ...), as the reference gives them."""
    gains = out.pop("dlayer_norm", None)
    for name, value in zip(GAIN_NAMES, gains or ()):
        out[f"d{name}"] = value
    return out


LSTM_REFERENCE_OPTIONS = ("coupled_gates", "forget_bias", "cell_clip", "recurrent_mask", "weight_mask",
                          "zoneout", "zoneout_cell")


def run_reference(cell, a, reference_masks, training=True, layer_norm=False, **options):
    activation = options.get("activation", "tanh")
    gains = dict(zip(GAIN_NAMES, a["gains"])) if layer_norm else {}
    if cell == "lstm":
        keys = {k: v for k, v in options.items() if k in LSTM_REFERENCE_OPTIONS}
        y, h_T, c_T, cache = ref.lstm_forward(a["x"], a["W"], a["R"], a["bW"], a["bR"], a["h0"], a["c0"],
                                              activation, peephole=a["P"], projection=a["W_hr"], **keys,
                                              **reference_masks, **gains)
        out = {"y": y, "h_T": h_T, "c_T": c_T}
        if training:
            names = ("dx", "dh0", "dc0", "dW", "dR", "dbW", "dbR", "dP", "dW_hr")
            *grads, d_gains = ref.lstm_backward(cache, a["dy"], a["dh_T"], a["dc_T"])
            out.update(zip(names, grads))
            out.update({f"d{name}": value for name, value in (d_gains or {}).items()})
        return out
    if cell == "gru":
        y, h_T, cache = ref.gru_forward(a["x"], a["W"], a["R"], a["bW"], a["bR"], a["h0"],
                                        options.get("reset_after", True), activation, **reference_masks,
                                        **gains)
        *grads, d_gains = ref.gru_backward(cache, a["dy"], a["dh_T"]) if training else (None,)
        gains_grads = {f"d{name}": value for name, value in (d_gains or {}).items()}
    else:
        y, h_T, cache = ref.rnn_forward(a["x"], a["W"], a["R"], a["bW"], a["bR"], a["h0"], activation,
                                        **reference_masks)
        grads = ref.rnn_backward(cache, a["dy"], a["dh_T"]) if training else ()
        gains_grads = {}
    return {"y": y, "h_T": h_T, **dict(zip(("dx", "dh0", "dW", "dR", "dbW", "dbR"), grads)), **gains_grads}


def assert_matches(got, expected, dtype):
    for name, value in expected.items():
        if value is None:
            assert got.get(name) is None, name
        else:
            assert_close(name, got[name], value, dtype)


REGULARISERS = [dict(weight_dropout=0.3), dict(zoneout=0.25), dict(zoneout_cell=0.35), dict(layer_norm=True),
                dict(weight_dropout=0.2, zoneout=0.15, zoneout_cell=0.3, recurrent_dropout=0.2),
                dict(layer_norm=True, weight_dropout=0.2, zoneout=0.15, zoneout_cell=0.3,
                     recurrent_dropout=0.2)]
CELLS = [("lstm", {}), ("lstm", dict(activation="relu", coupled_gates=True, forget_bias=1.0)),
         ("lstm", dict(cell_clip=0.5)), ("gru", dict(reset_after=True)), ("gru", dict(reset_after=False)),
         ("rnn", dict(activation="relu"))]


def applicable(cell, options, regularisers):
    return not ((cell == "rnn" and ("zoneout" in regularisers or "layer_norm" in regularisers))
                or (cell != "lstm" and "zoneout_cell" in regularisers)
                or (cell == "gru" and not options.get("reset_after") and "layer_norm" in regularisers))


# float32 with a cell clip is left out: it may land on the other side of a clip bound than float64.
CASES = [(c, o, r, dtype)
         for (c, o), r, dtype in itertools.product(CELLS, REGULARISERS, (np.float64, np.float32))
         if applicable(c, o, r) and not (dtype == np.float32 and o.get("cell_clip"))]


def case_id(case):
    cell, options, regularisers, dtype = case
    settings = [f"{k}={v}" for k, v in {**options, **regularisers}.items()]
    return "-".join([cell, *settings, np.dtype(dtype).name])


@pytest.mark.parametrize(("cell", "options", "regularisers", "dtype"), CASES, ids=[case_id(c) for c in CASES])
def test_training_matches_the_reference_with_the_generators_masks(cell, options, regularisers, dtype, rng):
    G = 3 if options.get("coupled_gates") or cell == "gru" else {"lstm": 4, "rnn": 1}[cell]
    a = problem(cell, 6, 3, 5, 7, rng, G=G, peephole=cell == "lstm")
    layer_norm = regularisers.get("layer_norm", False)
    mask_options = {k: v for k, v in regularisers.items() if k != "layer_norm"}
    expected = run_reference(cell, a, masks(cell, 6, 3, G, 7, 7, **mask_options), layer_norm=layer_norm,
                             **options)
    assert_matches(run_conveyor(cell, a, dtype, **options, **regularisers), expected, dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_evaluation_uses_zoneouts_expectation_and_no_dropconnect(cell, rng):
    a = problem(cell, 5, 3, 4, 6, rng)
    regularisers = dict(weight_dropout=0.4, zoneout=0.3) | ({"zoneout_cell": 0.2} if cell == "lstm" else {})
    got = run_conveyor(cell, a, training=False, layer_norm=True, **regularisers)
    expected = run_reference(cell, a, masks(cell, 5, 3, 0, 6, 6, training=False, **regularisers),
                             training=False, layer_norm=True)
    assert_matches(got, expected, np.float64)
    plain = run_conveyor(cell, a, training=False)
    assert np.abs(plain["y"] - got["y"]).max() > 1e-3  # zoneout's expectation changed the outputs


def test_with_a_projection_and_lengths(rng):
    """Every regulariser with a projection and variable lengths: each row equals the reference run on that row
    alone for its own steps, with its slices of the masks; the parameter gradients are the rows' sums."""
    T, B, I, H, S = 6, 4, 3, 7, 3
    a = problem("lstm", T, B, I, H, rng, S=S, peephole=True)
    regularisers = dict(weight_dropout=0.25, zoneout=0.2, zoneout_cell=0.3, recurrent_dropout=0.2,
                        variational=False)
    lengths = np.array([4, 6, 1, 3])
    got = run_conveyor("lstm", a, lengths=lengths, layer_norm=True, **regularisers)
    full_masks = masks("lstm", T, B, 4, H, S, **regularisers)
    sums = {}
    for b, n in enumerate(lengths):
        row = {k: None if v is None else (v[:n, b:b + 1] if k in ("x", "dy") else v[b:b + 1] if k in (
            "h0", "c0", "dh_T", "dc_T") else v) for k, v in a.items()}
        row_masks = {k: v if k == "weight_mask" else v[:n, b:b + 1] for k, v in full_masks.items()}
        expected = run_reference("lstm", row, row_masks, layer_norm=True)
        assert_close("y", got["y"][:n, b:b + 1], expected["y"], np.float64)
        assert not np.any(got["y"][n:, b]) and not np.any(got["dx"][n:, b])
        for name in ("h_T", "c_T", "dh0", "dc0"):
            assert_close(name, got[name][b:b + 1], expected[name], np.float64)
        assert_close("dx", got["dx"][:n, b:b + 1], expected["dx"], np.float64)
        for name in ("dW", "dR", "dbW", "dbR", "dP", "dW_hr", "dgamma_x", "dgamma_h", "dgamma_c", "dbeta_c"):
            sums[name] = sums.get(name, 0) + expected[name]
    for name, value in sums.items():
        assert_close(name, got[name], value, np.float64)


@pytest.mark.parametrize(("cell", "regularisers"), [
    ("lstm", dict(weight_dropout=0.3, zoneout=0.3, zoneout_cell=0.3, layer_norm=True)),
    ("gru", dict(weight_dropout=0.3, zoneout=0.3, layer_norm=True)),
    ("rnn", dict(weight_dropout=0.3)),
])
def test_gradients_match_finite_differences(cell, regularisers, rng):
    """Conveyor's own float64 gradients in training mode (the same masks in every call: one seed) against
    central differences of its forward."""
    a = problem(cell, 4, 2, 3, 5, rng)
    got = run_conveyor(cell, a, **regularisers)

    def loss(arrays):
        out = run_conveyor(cell, arrays, training=True, **regularisers)
        total = np.sum(out["y"] * arrays["dy"]) + np.sum(out["h_T"] * arrays["dh_T"])
        return total + (np.sum(out["c_T"] * arrays["dc_T"]) if cell == "lstm" else 0.0)

    eps = 1e-6
    for grad_name, name in (("dx", "x"), ("dh0", "h0"), ("dW", "W"), ("dR", "R"), ("dbR", "bR")):
        numeric = np.empty_like(a[name])
        for index in np.ndindex(a[name].shape):
            plus, minus = {**a, name: a[name].copy()}, {**a, name: a[name].copy()}
            plus[name][index] += eps
            minus[name][index] -= eps
            numeric[index] = (loss(plus) - loss(minus)) / (2 * eps)
        np.testing.assert_allclose(got[grad_name], numeric, rtol=1e-5, atol=1e-7, err_msg=grad_name)


def test_masks_are_fresh_per_seed_and_stream_and_dropconnect_drops_entries_of_R(rng):
    a = problem("lstm", 4, 2, 3, 5, rng)
    one = run_conveyor("lstm", a, weight_dropout=0.5)["y"]
    again = run_conveyor("lstm", a, weight_dropout=0.5)["y"]
    np.testing.assert_array_equal(one, again)
    M = masks("lstm", 4, 2, 4, 5, 5, weight_dropout=0.5)["weight_mask"]
    assert 0 < np.count_nonzero(M) < M.size and set(np.unique(M)) == {0.0, 2.0}
    other_seed = conveyor.lstm_forward(a["x"], a["W"], a["R"], a["bW"], a["bR"], weight_dropout=0.5,
                                       seed=SEED + 1, mask_stream=STREAM)[0]
    assert np.abs(other_seed - one).max() > 1e-6


def test_refusals_name_the_option(rng):
    a = problem("rnn", 3, 2, 3, 4, rng)
    with pytest.raises(TypeError, match="zoneout"):  # the functions take only their cell's options
        conveyor.rnn_forward(a["x"], a["W"], a["R"], None, None, zoneout=0.1)
    g = problem("gru", 3, 2, 3, 4, rng)
    with pytest.raises(TypeError, match="zoneout_cell"):
        conveyor.gru_forward(g["x"], g["W"], g["R"], None, None, zoneout_cell=0.1)
    # The core's own checks, for callers of the C++ API
    core_args = (None,) * 8 + (False, True)  # bW, bR, h0, c0, P, W_hr, layer_norm, lengths; packed, training
    with pytest.raises(ValueError, match="zoneout: an option of the LSTM and the GRU, but the cell is rnn"):
        conveyor._conveyor.forward("rnn", {"zoneout": 0.1}, a["x"], a["W"], a["R"], *core_args)
    with pytest.raises(ValueError, match="zoneout_cell: an LSTM option, but the cell is gru"):
        conveyor._conveyor.forward("gru", {"zoneout_cell": 0.1}, g["x"], g["W"], g["R"], *core_args)
    for name in ("weight_dropout", "zoneout", "zoneout_cell"):
        with pytest.raises(ValueError, match=rf"{name}: expected a probability in \[0, 1\), got 1.0"):
            conveyor.lstm_forward(a["x"], rng.uniform(size=(16, 3)), rng.uniform(size=(16, 4)), None, None,
                                  **{name: 1.0})
