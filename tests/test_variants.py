"""The variants of docs/math.md on the CPU backend against the float64 reference: every combination of the
LSTM options (peephole, coupled gates, forget bias, cell clip, relu, projection), recurrent dropout for every
cell, and the counter-based dropout masks themselves (bit for bit against the reference's own copy of the
generator)."""

import itertools

import numpy as np
import pytest

import conveyor

import reference as ref
from support import CONFIGS, assert_all_close, assert_close, config_id

LSTM_OPTIONS = [
    dict(peephole=peephole, coupled_gates=coupled, forget_bias=forget_bias, cell_clip=cell_clip,
         activation=activation, proj_size=proj_size)
    for peephole, coupled, forget_bias, cell_clip, activation, proj_size in itertools.product(
        (False, True), (False, True), (0.0, 1.0), (None, 0.4), ("tanh", "relu"), (None, 3))
]


def lstm_id(o):
    parts = [f"proj_size={o['proj_size']}"] if o["proj_size"] else []
    parts += [k for k in ("peephole", "coupled_gates") if o[k]]
    parts += [f"forget_bias={o['forget_bias']}"] if o["forget_bias"] else []
    parts += [f"cell_clip={o['cell_clip']}"] if o["cell_clip"] else []
    return "-".join(parts + [o["activation"]])


def lstm_problem(o, T, B, I, H, rng):
    G = 3 if o["coupled_gates"] else 4
    S = o["proj_size"] or H  # the units of h
    w = 1.0 / np.sqrt(H)
    u = rng.uniform
    return dict(x=u(-1, 1, (T, B, I)), W=u(-w, w, (G * H, I)), R=u(-w, w, (G * H, S)), bW=u(-w, w, G * H),
                bR=u(-w, w, G * H), h0=u(-0.5, 0.5, (B, S)), c0=u(-0.5, 0.5, (B, H)),
                P=u(-0.5, 0.5, (3, H)) if o["peephole"] else None,
                W_hr=u(-w, w, (S, H)) if o["proj_size"] else None,
                dy=u(-1, 1, (T, B, S)), dh_T=u(-1, 1, (B, S)), dc_T=u(-1, 1, (B, H)))


def run_lstm(p, o, dtype, **dropout):
    c = {k: None if v is None else v.astype(dtype) for k, v in p.items()}
    y, h_T, c_T, saved = conveyor.lstm_forward(
        c["x"], c["W"], c["R"], c["bW"], c["bR"], c["h0"], c["c0"], P=c["P"], W_hr=c["W_hr"],
        coupled_gates=o["coupled_gates"], forget_bias=o["forget_bias"], cell_clip=o["cell_clip"],
        activation=o["activation"], **dropout)
    g = conveyor.lstm_backward(saved, c["dy"], c["dh_T"], c["dc_T"])
    return {"y": y, "h_T": h_T, "c_T": c_T, **g._asdict()}


def reference_lstm(p, o, mask=None):
    y, h_T, c_T, cache = ref.lstm_forward(
        p["x"], p["W"], p["R"], p["bW"], p["bR"], p["h0"], p["c0"], o["activation"], peephole=p["P"],
        coupled_gates=o["coupled_gates"], forget_bias=o["forget_bias"], cell_clip=o["cell_clip"],
        recurrent_mask=mask, projection=p["W_hr"])
    names = ("dx", "dh0", "dc0", "dW", "dR", "dbW", "dbR", "dP", "dW_hr", "dlayer_norm")
    grads = dict(zip(names, ref.lstm_backward(cache, p["dy"], p["dh_T"], p["dc_T"])))
    return {"y": y, "h_T": h_T, "c_T": c_T, **grads}, cache


@pytest.mark.parametrize("o", LSTM_OPTIONS, ids=lstm_id)
def test_lstm_options_match_the_reference(o, rng):
    for _ in range(20):  # a problem on which the clip acts somewhere, else the test would be weak
        p = lstm_problem(o, 6, 3, 5, 7, rng)
        expected, cache = reference_lstm(p, o)
        if not o["cell_clip"] or np.any(np.abs(cache["cs"][1:]) == o["cell_clip"]):
            break
    else:
        pytest.fail("the clip never acted in 20 draws: a weak test")
    assert_all_close(run_lstm(p, o, np.float64), expected, np.float64)
    if not o["cell_clip"]:  # float32 could land on the other side of a clip bound than float64
        assert_all_close(run_lstm(p, o, np.float32), expected, np.float32)


@pytest.mark.parametrize("variational", [True, False], ids=["variational", "per-step"])
@pytest.mark.parametrize("o", LSTM_OPTIONS[::3], ids=lstm_id)
def test_lstm_options_with_recurrent_dropout_match_the_reference(o, variational, rng):
    p = lstm_problem(o, 5, 3, 4, 6, rng)
    mask = ref.dropout_mask(0.25, variational, 11, 3, (5, 3, o["proj_size"] or 6))
    expected, _ = reference_lstm(p, o, mask)
    got = run_lstm(p, o, np.float64, recurrent_dropout=0.25, variational=variational, seed=11, mask_stream=3)
    assert_all_close(got, expected, np.float64)


WITHOUT_PEEPHOLES = [o for o in LSTM_OPTIONS if not o["peephole"] and not o["proj_size"]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("o", WITHOUT_PEEPHOLES, ids=lstm_id)
def test_forward_without_peepholes_equals_zero_peepholes_bit_for_bit(o, dtype, rng):
    """The CPU forward runs a window without peepholes in two loops (the gates, then the cell), one with them
    in one loop: with peephole weights of zero (whose terms add +-0) both are cells::lstm_forward's
    arithmetic, so the outputs, and the gradients from the caches, are the same bits. H = 37: vector loops
    and their scalar remainders."""
    p = {k: None if v is None else v.astype(dtype) for k, v in lstm_problem(o, 6, 5, 4, 37, rng).items()}
    options = dict(coupled_gates=o["coupled_gates"], forget_bias=o["forget_bias"], cell_clip=o["cell_clip"],
                   activation=o["activation"])
    args = [p[k] for k in ("x", "W", "R", "bW", "bR", "h0", "c0")]
    plain = conveyor.lstm_forward(*args, **options)
    zero = conveyor.lstm_forward(*args, P=np.zeros((3, 37), dtype), **options)
    for name, a, b in zip(("y", "h_T", "c_T"), plain[:3], zero[:3]):
        np.testing.assert_array_equal(a, b, err_msg=name)
    grads = [conveyor.lstm_backward(run[3], p["dy"], None, None) for run in (plain, zero)]
    for name in ("dx", "dW", "dR"):
        np.testing.assert_array_equal(getattr(grads[0], name), getattr(grads[1], name), err_msg=name)


def test_coupled_gates_weights_have_three_blocks(rng):
    o = dict(LSTM_OPTIONS[0], coupled_gates=True)
    p = lstm_problem(o, 2, 2, 3, 4, rng)
    p["W"] = np.concatenate([p["W"], p["W"][:4]])  # four blocks: refused, naming W
    with pytest.raises(ValueError, match=r"W: expected shape \(12, 3\)"):
        run_lstm(p, o, np.float64)


@pytest.mark.parametrize("variational", [True, False], ids=["variational", "per-step"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_recurrent_dropout_matches_the_reference_given_the_mask(config, variational, rng):
    cell, options = config
    T, B, I, H, q, seed, stream = 5, 4, 3, 6, 0.3, 1234, 7
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    w = 1.0 / np.sqrt(H)
    x, W, R = rng.uniform(-1, 1, (T, B, I)), rng.uniform(-w, w, (G * H, I)), rng.uniform(-w, w, (G * H, H))
    bW, bR, h0 = rng.uniform(-w, w, G * H), rng.uniform(-w, w, G * H), rng.uniform(-0.5, 0.5, (B, H))
    dy, dh_T = rng.uniform(-1, 1, (T, B, H)), rng.uniform(-1, 1, (B, H))
    mask = ref.dropout_mask(q, variational, seed, stream, (T, B, H))
    assert 0 < np.count_nonzero(mask == 0) < mask.size
    dropout = dict(recurrent_dropout=q, variational=variational, seed=seed, mask_stream=stream)
    if cell == "lstm":
        c0, dc_T = rng.uniform(-0.5, 0.5, (B, H)), rng.uniform(-1, 1, (B, H))
        y, h_T, c_T, saved = conveyor.lstm_forward(x, W, R, bW, bR, h0, c0, **options, **dropout)
        g = conveyor.lstm_backward(saved, dy, dh_T, dc_T)._asdict()
        ry, rh, rc, cache = ref.lstm_forward(x, W, R, bW, bR, h0, c0, options["activation"],
                                             recurrent_mask=mask)
        names = ("dx", "dh0", "dc0", "dW", "dR", "dbW", "dbR", "dP", "dW_hr")
        rg = dict(zip(names, ref.lstm_backward(cache, dy, dh_T, dc_T)))
        assert_close("c_T", c_T, rc, np.float64)
    else:
        forward, backward = getattr(conveyor, f"{cell}_forward"), getattr(conveyor, f"{cell}_backward")
        y, h_T, saved = forward(x, W, R, bW, bR, h0, **options, **dropout)
        g = backward(saved, dy, dh_T)._asdict()
        ry, rh, cache = getattr(ref, f"{cell}_forward")(x, W, R, bW, bR, h0, **options, recurrent_mask=mask)
        rg = dict(zip(("dx", "dh0", "dW", "dR", "dbW", "dbR"),
                      getattr(ref, f"{cell}_backward")(cache, dy, dh_T)))
    assert_close("y", y, ry, np.float64)
    assert_close("h_T", h_T, rh, np.float64)
    for name, value in rg.items():
        if value is None:
            assert g[name] is None
        else:
            assert_close(name, g[name], value, np.float64)


def test_recurrent_dropout_changes_nothing_in_inference(rng):
    x, W, R = rng.uniform(-1, 1, (4, 2, 3)), rng.uniform(-0.5, 0.5, (4, 3)), rng.uniform(-0.5, 0.5, (4, 4))
    plain, _, _ = conveyor.rnn_forward(x, W, R, None, None, training=False)
    dropped, _, _ = conveyor.rnn_forward(x, W, R, None, None, recurrent_dropout=0.5, training=False)
    np.testing.assert_array_equal(dropped, plain)
    trained, _, _ = conveyor.rnn_forward(x, W, R, None, None, recurrent_dropout=0.5)
    assert not np.array_equal(trained, plain)


# ---------------------------------------------------------------------------------------------------------
# The masks


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("variational", [True, False], ids=["variational", "per-step"])
def test_masks_equal_the_reference_generator_bit_for_bit(variational, dtype):
    x = np.zeros(1, dtype)
    for p, seed, stream in [(0.25, 0, 0), (0.5, 2**64 - 1, 3), (0.9, 12345, 2**40)]:
        got = conveyor.dropout_mask(x, (7, 5, 33), p, variational=variational, seed=seed, mask_stream=stream)
        expected = ref.dropout_mask(p, variational, seed, stream, (7, 5, 33)).astype(dtype)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, expected)


def test_variational_masks_are_constant_across_time_and_others_are_not():
    x = np.zeros(1)
    shared = conveyor.dropout_mask(x, (6, 8, 50), 0.5, variational=True, seed=3)
    assert all(np.array_equal(shared[t], shared[0]) for t in range(6))
    fresh = conveyor.dropout_mask(x, (6, 8, 50), 0.5, variational=False, seed=3)
    assert sum(np.array_equal(fresh[t], fresh[0]) for t in range(1, 6)) == 0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_kept_fraction_is_within_statistical_bounds(p):
    n = 200 * 50 * 64
    mask = conveyor.dropout_mask(np.zeros(1), (200, 50, 64), p, seed=99)
    kept = np.count_nonzero(mask) / n
    assert abs(kept - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)  # 5 standard deviations of a binomial
    np.testing.assert_array_equal(np.unique(mask), [0.0, 1.0 / (1.0 - p)])


def test_seeds_and_streams_give_different_masks():
    x = np.zeros(1)
    base = conveyor.dropout_mask(x, (3, 4, 32), 0.5, seed=1, mask_stream=0)
    assert not np.array_equal(base, conveyor.dropout_mask(x, (3, 4, 32), 0.5, seed=2, mask_stream=0))
    assert not np.array_equal(base, conveyor.dropout_mask(x, (3, 4, 32), 0.5, seed=1, mask_stream=1))
    np.testing.assert_array_equal(base, conveyor.dropout_mask(x, (3, 4, 32), 0.5, seed=1, mask_stream=0))


# ---------------------------------------------------------------------------------------------------------
# Bad options


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(forget_bias=float("nan")), ValueError, "forget_bias: expected a finite number"),
    (dict(forget_bias="1"), TypeError, "forget_bias: expected a number"),
    (dict(cell_clip=0.0), ValueError, "cell_clip: expected a finite number > 0"),
    (dict(cell_clip=-1.0), ValueError, "cell_clip: expected a finite number > 0"),
    (dict(cell_clip=float("inf")), ValueError, "cell_clip: expected a finite number > 0"),
    (dict(coupled_gates=1), TypeError, "coupled_gates: expected True or False"),
    (dict(recurrent_dropout=1.0), ValueError, r"recurrent_dropout: expected a probability in \[0, 1\)"),
    (dict(recurrent_dropout=float("nan")), ValueError, "recurrent_dropout: expected a probability"),
    (dict(recurrent_dropout=0.5, seed=-1), ValueError, r"seed: expected an integer in \[0, 2\*\*64\)"),
    (dict(recurrent_dropout=0.5, mask_stream=2**64), ValueError, "mask_stream: expected an integer"),
    (dict(recurrent_dropout=0.5, variational="yes"), TypeError, "variational: expected True or False"),
    (dict(P=np.zeros((3, 5))), ValueError, r"P: expected shape \(3, 4\)"),
    (dict(P=np.zeros((3, 4), np.float32)), TypeError, "P: expected dtype float64"),
])
def test_bad_lstm_options_raise_naming_the_option(kwargs, error, message, rng):
    x, W, R = rng.uniform(-1, 1, (3, 2, 5)), rng.uniform(-1, 1, (16, 5)), rng.uniform(-1, 1, (16, 4))
    with pytest.raises(error, match=message):
        conveyor.lstm_forward(x, W, R, None, None, **kwargs)


def test_bad_mask_arguments_raise():
    with pytest.raises(ValueError, match=r"p: expected a probability in \[0, 1\)"):
        conveyor.dropout_mask(np.zeros(1), (2, 2, 2), 1.5)
    with pytest.raises(ValueError, match=r"shape: expected \(T, B, H\)"):
        conveyor.dropout_mask(np.zeros(1), (2, 2), 0.5)
