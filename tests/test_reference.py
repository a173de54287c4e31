"""Checks of the float64 reference (tests/reference.py): its backward against central finite differences,
its forward against a hand-written single step and, when torch is installed, against torch.nn."""

import numpy as np
import pytest

import reference as ref
from support import CONFIGS, config_id

EPS = 1e-6  # central finite-difference step
RELU_MARGIN = 1e-3  # every relu argument stays this far from its kink, so a step of EPS never crosses it
CLIP_MARGIN = 1e-3  # every unclipped LSTM cell value stays this far from +-cell_clip, for the same reason

CONFIG_IDS = [config_id(c) for c in CONFIGS]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _problem(cell, T, B, input_size, H, rng, scale=0.5, *, coupled=False, peephole=False):
    """Random inputs and random nonzero output gradients for one window.

    LSTM only: `coupled` gives the 3-block weights of coupled_gates=True, `peephole` adds a [3, H] peephole
    to the inputs (so the finite-difference checks cover it like any other input).
    """
    G = 3 if coupled else GATES[cell]
    p = {
        "x": rng.normal(scale=scale, size=(T, B, input_size)),
        "W": rng.normal(scale=scale, size=(G * H, input_size)),
        "R": rng.normal(scale=scale, size=(G * H, H)),
        "bW": rng.normal(scale=scale, size=G * H),
        "bR": rng.normal(scale=scale, size=G * H),
        "h0": rng.normal(scale=scale, size=(B, H)),
    }
    seeds = {"dy": rng.normal(size=(T, B, H)), "dh_T": rng.normal(size=(B, H))}
    if cell == "lstm":
        p["c0"] = rng.normal(scale=scale, size=(B, H))
        seeds["dc_T"] = rng.normal(size=(B, H))
    if peephole:
        p["peephole"] = rng.normal(scale=scale, size=(3, H))
    return p, seeds


def _mask(T, B, H, rng, q=0.3):
    """A random inverted-dropout mask: 0 with probability q, else 1 / (1 - q); both values present."""
    for _ in range(100):
        m = (rng.random((T, B, H)) >= q) / (1.0 - q)
        if 0 < np.count_nonzero(m) < m.size:
            return m
    raise AssertionError("no mixed mask in 100 draws")


def _forward(cell, opts, p):
    """Returns (y, final states as a tuple, cache) for any cell."""
    if cell == "lstm":
        y, h_T, c_T, cache = ref.lstm_forward(**p, **opts)
        return y, (h_T, c_T), cache
    forward = ref.gru_forward if cell == "gru" else ref.rnn_forward
    y, h_T, cache = forward(**p, **opts)
    return y, (h_T,), cache


def _backward(cell, cache, seeds):
    """Returns the gradients as a dict keyed like the inputs."""
    if cell == "lstm":
        names = ("x", "h0", "c0", "W", "R", "bW", "bR", "peephole", "projection")
        *grads, d_layer_norm = ref.lstm_backward(cache, seeds["dy"], seeds["dh_T"], seeds["dc_T"])
        assert len(grads) == len(names)
        grads = dict(zip(names, grads))
        for name in ("peephole", "projection"):
            if grads[name] is None:
                assert cache[name] is None
                del grads[name]
        return {**grads, **(d_layer_norm or {})}
    if cell == "gru":
        *grads, d_layer_norm = ref.gru_backward(cache, seeds["dy"], seeds["dh_T"])
        return {**dict(zip(("x", "h0", "W", "R", "bW", "bR"), grads)), **(d_layer_norm or {})}
    return dict(zip(("x", "h0", "W", "R", "bW", "bR"), ref.rnn_backward(cache, seeds["dy"], seeds["dh_T"])))


def _loss(cell, opts, p, seeds):
    """L = sum(y * dy) + sum(h_T * dh_T) (+ sum(c_T * dc_T)), whose gradients are what backward returns."""
    y, states, _ = _forward(cell, opts, p)
    state_seeds = (seeds["dh_T"], seeds["dc_T"]) if cell == "lstm" else (seeds["dh_T"],)
    return np.sum(y * seeds["dy"]) + sum(np.sum(s * d) for s, d in zip(states, state_seeds))


def _relu_arguments(cell, cache):
    """Every array the cell passes through act (LSTM: act(a_g) and act(c_t))."""
    args = [v for k, v in cache.items() if k.startswith("pre_")]
    if cell == "lstm":
        args.append(cache["cs"][1:])
    return args


def _is_valid(cell, opts, p):
    """True when no relu argument sits within RELU_MARGIN of the kink and, with a cell clip, no unclipped cell
    value sits within CLIP_MARGIN of +-cell_clip while at least one is clipped and one is not."""
    if opts["activation"] == "tanh" and opts.get("cell_clip") is None:
        return True
    _, _, cache = _forward(cell, opts, p)
    relu_distance = min(np.abs(a).min() for a in _relu_arguments(cell, cache))
    if opts["activation"] == "relu" and relu_distance <= RELU_MARGIN:
        return False
    clip = opts.get("cell_clip")
    if clip is None:
        return True
    distance = np.abs(np.abs(cache["c_unclipped"]) - clip)
    return distance.min() > CLIP_MARGIN and 0 < np.count_nonzero(cache["clip_pass"]) < distance.size


def _valid_problem(cell, opts, sizes, seed, **kw):
    """A random problem: the first seed from `seed` on that passes `_is_valid`."""
    for s in range(seed, seed + 100):
        p, seeds = _problem(cell, *sizes, np.random.default_rng(s), **kw)
        if _is_valid(cell, opts, p):
            return p, seeds
    raise AssertionError("no problem away from the relu kink and the clip bounds in 100 seeds")


def _draw_valid_problem(cell, opts, sizes, rng, **kw):
    """Like `_valid_problem`, drawing from `rng`."""
    for _ in range(100):
        p, seeds = _problem(cell, *sizes, rng, **kw)
        if _is_valid(cell, opts, p):
            return p, seeds
    raise AssertionError("no problem away from the relu kink and the clip bounds in 100 draws")


def _check_against_finite_differences(cell, opts, p, seeds):
    """Every gradient backward returns (one per entry of p) against central finite differences of the loss."""
    _, _, cache = _forward(cell, opts, p)
    grads = _backward(cell, cache, seeds)
    assert set(grads) == set(p)
    for name, value in p.items():
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            plus = {**p, name: value.copy()}
            minus = {**p, name: value.copy()}
            plus[name][idx] += EPS
            minus[name][idx] -= EPS
            numeric[idx] = (_loss(cell, opts, plus, seeds) - _loss(cell, opts, minus, seeds)) / (2 * EPS)
        assert grads[name].shape == value.shape, name
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=f"d{name}")
    return grads


@pytest.mark.parametrize("sizes", [(3, 2, 3, 4), (1, 1, 3, 4)], ids=["T3B2I3H4", "T1B1I3H4"])
@pytest.mark.parametrize(("cell", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_backward_matches_finite_differences(cell, opts, sizes):
    p, seeds = _valid_problem(cell, opts, sizes, seed=1234)
    _check_against_finite_differences(cell, opts, p, seeds)


SIZES = (4, 3, 5, 4)  # T, B, I, H
CLIP = 0.25  # small enough that some cell values of a `_problem` are clipped

# LSTM options, as (id, keyword options, whether the problem carries a peephole).
LSTM_OPTIONS = [
    ("peephole", {"activation": "tanh"}, True),
    ("peephole-relu", {"activation": "relu"}, True),
    ("coupled", {"activation": "tanh", "coupled_gates": True}, False),
    ("coupled-relu", {"activation": "relu", "coupled_gates": True}, False),
    ("peephole-coupled", {"activation": "tanh", "coupled_gates": True}, True),
    ("forget_bias", {"activation": "tanh", "forget_bias": 1.0}, False),
    ("cell_clip", {"activation": "tanh", "cell_clip": CLIP}, False),
    ("relu-cell_clip", {"activation": "relu", "cell_clip": CLIP}, False),
    ("peephole-cell_clip", {"activation": "tanh", "cell_clip": CLIP}, True),
    ("all", {"activation": "tanh", "coupled_gates": True, "forget_bias": 1.0, "cell_clip": CLIP}, True),
    ("all-relu", {"activation": "relu", "coupled_gates": True, "forget_bias": 1.0, "cell_clip": CLIP}, True),
]
LSTM_OPTION_IDS = [name for name, _, _ in LSTM_OPTIONS]


@pytest.mark.parametrize(("opts", "peephole"), [o[1:] for o in LSTM_OPTIONS], ids=LSTM_OPTION_IDS)
def test_lstm_options_backward_matches_finite_differences(opts, peephole, rng):
    coupled = opts.get("coupled_gates", False)
    p, seeds = _draw_valid_problem("lstm", opts, SIZES, rng, coupled=coupled, peephole=peephole)
    _, _, cache = _forward("lstm", opts, p)
    if "cell_clip" in opts:
        assert np.any(np.abs(cache["cs"][1:]) == opts["cell_clip"]), "no cell value is clipped"
        assert np.all(np.abs(cache["cs"][1:]) <= opts["cell_clip"])
    grads = _check_against_finite_differences("lstm", opts, p, seeds)
    if peephole and coupled:
        np.testing.assert_array_equal(grads["peephole"][0], 0.0)  # p_i is unused with coupled gates


@pytest.mark.parametrize(("opts", "peephole"), [o[1:] for o in LSTM_OPTIONS], ids=LSTM_OPTION_IDS)
def test_lstm_options_with_recurrent_mask_backward_matches_finite_differences(opts, peephole, rng):
    T, B, _, H = SIZES
    opts = {**opts, "recurrent_mask": _mask(T, B, H, rng)}
    coupled = opts.get("coupled_gates", False)
    p, seeds = _draw_valid_problem("lstm", opts, SIZES, rng, coupled=coupled, peephole=peephole)
    _check_against_finite_differences("lstm", opts, p, seeds)


@pytest.mark.parametrize(("cell", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_recurrent_mask_backward_matches_finite_differences(cell, opts, rng):
    T, B, _, H = SIZES
    opts = {**opts, "recurrent_mask": _mask(T, B, H, rng)}
    p, seeds = _draw_valid_problem(cell, opts, SIZES, rng)
    _check_against_finite_differences(cell, opts, p, seeds)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _one_step(cell, opts, p, mask=None):
    """One step of docs/math.md written out by hand: (h_1, c_1) for the LSTM, (h_1,) otherwise. ``mask``
    multiplies h_0 where it meets R; the GRU's output mix uses the unmasked h_0."""
    act = np.tanh if opts["activation"] == "tanh" else (lambda v: np.maximum(v, 0.0))
    x, h0 = p["x"][0], p["h0"]
    hm = h0 if mask is None else mask[0] * h0  # what R sees
    G = GATES[cell]
    Ws, Rs = np.split(p["W"], G), np.split(p["R"], G)
    bWs, bRs = np.split(p["bW"], G), np.split(p["bR"], G)

    def pre(k):
        return x @ Ws[k].T + bWs[k] + hm @ Rs[k].T + bRs[k]

    if cell == "lstm":
        i, f, g, o = _sigmoid(pre(0)), _sigmoid(pre(1)), act(pre(2)), _sigmoid(pre(3))
        c = f * p["c0"] + i * g
        return o * act(c), c
    if cell == "gru":
        r, z = _sigmoid(pre(0)), _sigmoid(pre(1))
        if opts["reset_after"]:
            n = act(x @ Ws[2].T + bWs[2] + r * (hm @ Rs[2].T + bRs[2]))
        else:
            n = act(x @ Ws[2].T + bWs[2] + (r * hm) @ Rs[2].T + bRs[2])
        return ((1.0 - z) * n + z * h0,)
    return (act(pre(0)),)


def _assert_step(y, states, expected):
    np.testing.assert_allclose(y[0], expected[0], rtol=1e-13, atol=1e-15)
    assert len(states) == len(expected)
    for got, want in zip(states, expected):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("cell", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_single_step_matches_spec(cell, opts):
    p, _ = _problem(cell, 1, 3, 5, 4, np.random.default_rng(7))
    y, states, _ = _forward(cell, opts, p)
    _assert_step(y, states, _one_step(cell, opts, p))


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("coupled", [False, True], ids=["4gates", "coupled"])
def test_lstm_with_options_matches_spec(coupled, activation, rng):
    T, B, input_size, H = 3, 3, 5, 4
    p, _ = _problem("lstm", T, B, input_size, H, rng, coupled=coupled, peephole=True)
    mask = _mask(T, B, H, rng)
    forget_bias = 0.7
    act = np.tanh if activation == "tanh" else (lambda v: np.maximum(v, 0.0))
    G = 3 if coupled else 4
    Ws, Rs = np.split(p["W"], G), np.split(p["R"], G)
    bWs, bRs = np.split(p["bW"], G), np.split(p["bR"], G)
    p_i, p_f, p_o = p["peephole"]

    def run(cell_clip):
        """The spec's LSTM step by hand over the window: (ys, cs, unclipped cell values)."""
        h, c = p["h0"], p["c0"]
        ys, cs, unclipped = [], [], []
        for t in range(T):
            hm = mask[t] * h

            def pre(k, t=t, hm=hm):
                return p["x"][t] @ Ws[k].T + bWs[k] + hm @ Rs[k].T + bRs[k]

            if coupled:
                f = _sigmoid(pre(0) + p_f * c + forget_bias)
                i, g, a_o = 1.0 - f, act(pre(1)), pre(2)
            else:
                i = _sigmoid(pre(0) + p_i * c)
                f = _sigmoid(pre(1) + p_f * c + forget_bias)
                g, a_o = act(pre(2)), pre(3)
            unclipped.append(f * c + i * g)
            c = unclipped[-1] if cell_clip is None else np.clip(unclipped[-1], -cell_clip, cell_clip)
            h = _sigmoid(a_o + p_o * c) * act(c)
            ys.append(h)
            cs.append(c)
        return np.array(ys), np.array(cs), np.array(unclipped)

    cell_clip = np.quantile(np.abs(run(None)[2]), 0.7)  # clips some of the cell values of the first steps
    ys, cs, _ = run(cell_clip)
    assert np.any(np.abs(cs) == cell_clip)
    opts = {"activation": activation, "coupled_gates": coupled, "forget_bias": forget_bias,
            "cell_clip": cell_clip, "recurrent_mask": mask}
    y, (h_T, c_T), cache = _forward("lstm", opts, p)
    np.testing.assert_allclose(y, ys, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(h_T, ys[-1], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(c_T, cs[-1], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(cache["cs"][1:], cs, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("cell", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_single_step_with_recurrent_mask_matches_spec(cell, opts, rng):
    p, _ = _problem(cell, 1, 3, 5, 4, rng)
    mask = _mask(1, 3, 4, rng)
    y, states, _ = _forward(cell, {**opts, "recurrent_mask": mask}, p)
    _assert_step(y, states, _one_step(cell, opts, p, mask))


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_coupled_gates_equal_a_tied_four_gate_lstm(activation, rng):
    """CIFG equals a 4-gate LSTM whose i pre-activation is minus f's (sigmoid(-v) = 1 - sigmoid(v)), forward
    and backward: the coupled gradients of the f block are the 4-gate ones of f minus those of i."""
    T, B, _, H = SIZES
    forget_bias = 0.6
    p, seeds = _problem("lstm", *SIZES, rng, coupled=True, peephole=True)
    P = p["peephole"].copy()
    P[0] = -P[1]

    def with_i_block(w, i_block):
        return np.concatenate([i_block, w], axis=0)

    H3 = slice(0, H)  # the f block of the coupled weights
    p4 = {
        **p,
        "W": with_i_block(p["W"], -p["W"][H3]),
        "R": with_i_block(p["R"], -p["R"][H3]),
        "bW": with_i_block(p["bW"], -p["bW"][H3] - forget_bias),
        "bR": with_i_block(p["bR"], -p["bR"][H3]),
        "peephole": P,
    }
    opts = {"activation": activation, "forget_bias": forget_bias, "cell_clip": 0.4,
            "recurrent_mask": _mask(T, B, H, rng)}
    y3, states3, cache3 = _forward("lstm", {**opts, "coupled_gates": True}, p)
    y4, states4, cache4 = _forward("lstm", opts, p4)
    np.testing.assert_allclose(y3, y4, rtol=1e-12, atol=1e-14)
    assert len(states3) == len(states4)
    for got, want in zip(states3, states4):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)

    g3, g4 = _backward("lstm", cache3, seeds), _backward("lstm", cache4, seeds)
    for name in ("x", "h0", "c0"):
        np.testing.assert_allclose(g3[name], g4[name], rtol=1e-10, atol=1e-12, err_msg=f"d{name}")
    for name in ("W", "R", "bW", "bR"):
        folded = g4[name][H:].copy()
        folded[H3] -= g4[name][:H]
        np.testing.assert_allclose(g3[name], folded, rtol=1e-10, atol=1e-12, err_msg=f"d{name}")
    np.testing.assert_allclose(g3["peephole"][1:], [g4["peephole"][1] - g4["peephole"][0], g4["peephole"][2]],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("cell", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_neutral_options_reproduce_the_plain_results_exactly(cell, opts):
    """A mask of ones (every cell) and, for the LSTM, a zero peephole, forget_bias=0 and a cell clip nobody
    reaches give bit-for-bit the outputs and gradients of the plain call."""
    T, B, _, H = SIZES
    p, seeds = _problem(cell, *SIZES, np.random.default_rng(21))
    neutral = {**opts, "recurrent_mask": np.ones((T, B, H))}
    p_neutral = dict(p)
    if cell == "lstm":
        neutral.update(forget_bias=0.0, cell_clip=1e9)
        p_neutral["peephole"] = np.zeros((3, H))
    y, states, cache = _forward(cell, opts, p)
    y_n, states_n, cache_n = _forward(cell, neutral, p_neutral)
    np.testing.assert_array_equal(y_n, y)
    assert len(states_n) == len(states)
    for got, want in zip(states_n, states):
        np.testing.assert_array_equal(got, want)
    grads, grads_n = _backward(cell, cache, seeds), _backward(cell, cache_n, seeds)
    assert set(grads_n) == set(p_neutral)
    for name, value in grads.items():
        np.testing.assert_array_equal(grads_n[name], value, err_msg=f"d{name}")


def test_lstm_windows_with_options_give_the_same_forward_as_one_call():
    T, B, _, H = 6, 2, 3, 4
    p, _ = _problem("lstm", T, B, 3, H, np.random.default_rng(12), coupled=True, peephole=True)
    mask = _mask(T, B, H, np.random.default_rng(13))
    opts = {"activation": "tanh", "coupled_gates": True, "forget_bias": 1.0, "cell_clip": CLIP}
    y, states, _ = _forward("lstm", {**opts, "recurrent_mask": mask}, p)
    y1, states1, _ = _forward("lstm", {**opts, "recurrent_mask": mask[:2]}, {**p, "x": p["x"][:2]})
    second = {**p, "x": p["x"][2:], "h0": states1[0], "c0": states1[1]}
    y2, states2, _ = _forward("lstm", {**opts, "recurrent_mask": mask[2:]}, second)
    np.testing.assert_array_equal(np.concatenate([y1, y2]), y)
    assert len(states2) == len(states)
    for got, want in zip(states2, states):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("cell", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_windows_give_the_same_forward_as_one_call(cell, opts):
    p, _ = _problem(cell, 6, 2, 3, 4, np.random.default_rng(11))
    y, states, _ = _forward(cell, opts, p)
    first = {**p, "x": p["x"][:2]}
    y1, states1, _ = _forward(cell, opts, first)
    second = {**p, "x": p["x"][2:], "h0": states1[0]}
    if cell == "lstm":
        second["c0"] = states1[1]
    y2, states2, _ = _forward(cell, opts, second)
    np.testing.assert_array_equal(np.concatenate([y1, y2]), y)
    assert len(states2) == len(states)
    for got, want in zip(states2, states):
        np.testing.assert_array_equal(got, want)


def test_bad_arguments_raise_value_error():
    p, _ = _problem("rnn", 2, 2, 3, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"^activation:"):
        ref.rnn_forward(**p, activation="sigmoid")
    with pytest.raises(ValueError, match=r"^W:"):
        ref.rnn_forward(**{**p, "W": p["W"][:, :2]})
    with pytest.raises(ValueError, match=r"^h0:"):
        ref.rnn_forward(**{**p, "h0": p["h0"][:1]})
    with pytest.raises(ValueError, match=r"^recurrent_mask:"):
        ref.rnn_forward(**p, recurrent_mask=np.ones((2, 2, 3)))
    g, _ = _problem("gru", 2, 2, 3, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"^recurrent_mask:"):
        ref.gru_forward(**g, recurrent_mask=np.ones((1, 2, 4)))
    lstm, _ = _problem("lstm", 2, 2, 3, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"^recurrent_mask:"):
        ref.lstm_forward(**lstm, recurrent_mask=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"^peephole:"):
        ref.lstm_forward(**lstm, peephole=np.ones((4, 4)))
    with pytest.raises(ValueError, match=r"^R:"):
        ref.lstm_forward(**lstm, coupled_gates=True)  # 4-block weights for a 3-block cell
    for clip in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match=r"^cell_clip:"):
            ref.lstm_forward(**lstm, cell_clip=clip)
    with pytest.raises(ValueError, match=r"^forget_bias:"):
        ref.lstm_forward(**lstm, forget_bias=np.nan)


TORCH_PARAMETERS = {"weight_ih_l0": "W", "weight_hh_l0": "R", "bias_ih_l0": "bW", "bias_hh_l0": "bR"}
TORCH_CONFIGS = [
    ("lstm", {"activation": "tanh"}),
    ("gru", {"reset_after": True, "activation": "tanh"}),
    ("rnn", {"activation": "tanh"}),
    ("rnn", {"activation": "relu"}),
]


@pytest.mark.parametrize(
    ("cell", "opts"), TORCH_CONFIGS, ids=[f"{cell}-{opts['activation']}" for cell, opts in TORCH_CONFIGS]
)
def test_forward_matches_torch(cell, opts):
    torch = pytest.importorskip("torch")
    T, B, input_size, H = 5, 3, 3, 4
    p, _ = _problem(cell, T, B, input_size, H, np.random.default_rng(3))
    if cell == "lstm":
        module = torch.nn.LSTM(input_size, H)
    elif cell == "gru":
        module = torch.nn.GRU(input_size, H)
    else:
        module = torch.nn.RNN(input_size, H, nonlinearity=opts["activation"])
    module = module.double()
    with torch.no_grad():
        for name, key in TORCH_PARAMETERS.items():
            getattr(module, name).copy_(torch.from_numpy(p[key]))
        h0 = torch.from_numpy(p["h0"])[None]
        state = (h0, torch.from_numpy(p["c0"])[None]) if cell == "lstm" else h0
        y_torch, states_torch = module(torch.from_numpy(p["x"]), state)
    if cell != "lstm":
        states_torch = (states_torch,)

    y, states, _ = _forward(cell, opts, p)
    np.testing.assert_allclose(y, y_torch.numpy(), rtol=1e-12, atol=1e-14)
    assert len(states) == len(states_torch)
    for got, want in zip(states, states_torch):
        np.testing.assert_allclose(got, want[0].numpy(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------- projection (LSTMP)


def _projected_problem(T, B, input_size, H, P, rng, scale=0.5, **kw):
    """An LSTM problem whose state is projected from H to P units: R [4H, P], h0 and dy of P units."""
    p, seeds = _problem("lstm", T, B, input_size, H, rng, scale, **kw)
    G = p["R"].shape[0] // H
    p["R"] = rng.normal(scale=scale, size=(G * H, P))
    p["h0"] = rng.normal(scale=scale, size=(B, P))
    p["projection"] = rng.normal(scale=scale, size=(P, H))
    seeds["dy"], seeds["dh_T"] = rng.normal(size=(T, B, P)), rng.normal(size=(B, P))
    return p, seeds


@pytest.mark.parametrize(("opts", "peephole"), [o[1:] for o in LSTM_OPTIONS if o[0] in
                                                ("peephole", "coupled", "forget_bias", "all")],
                         ids=["peephole", "coupled", "forget_bias", "all"])
def test_projection_backward_matches_finite_differences(opts, peephole, rng):
    """The projected LSTM's backward, dW_hr included, against central finite differences, with options."""
    for _ in range(100):
        p, seeds = _projected_problem(3, 2, 3, 4, 2, rng, coupled=opts.get("coupled_gates", False),
                                      peephole=peephole)
        if _is_valid("lstm", opts, p):
            break
    else:
        raise AssertionError("no problem away from the relu kink and the clip bounds in 100 draws")
    _check_against_finite_differences("lstm", opts, p, seeds)


def test_projection_with_a_recurrent_mask_matches_finite_differences(rng):
    p, seeds = _projected_problem(4, 3, 3, 5, 3, rng)
    _check_against_finite_differences("lstm", {"activation": "tanh", "recurrent_mask": _mask(4, 3, 3, rng)},
                                      p, seeds)


def test_projection_matches_torch(rng):
    """Outputs and final states against torch.nn.LSTM(proj_size=P) with the same weights, float64."""
    torch = pytest.importorskip("torch")
    T, B, I, H, P = 5, 3, 4, 6, 2
    p, _ = _projected_problem(T, B, I, H, P, rng)
    module = torch.nn.LSTM(I, H, proj_size=P).double()
    with torch.no_grad():
        for name, key in (("weight_ih_l0", "W"), ("weight_hh_l0", "R"), ("bias_ih_l0", "bW"),
                          ("bias_hh_l0", "bR"), ("weight_hr_l0", "projection")):
            getattr(module, name).copy_(torch.from_numpy(p[key]))
        states = (torch.from_numpy(p["h0"])[None], torch.from_numpy(p["c0"])[None])
        y_torch, (h_torch, c_torch) = module(torch.from_numpy(p["x"]), states)
    y, h_T, c_T, _ = ref.lstm_forward(**p, activation="tanh")
    np.testing.assert_allclose(y, y_torch.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h_T, h_torch[0].numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(c_T, c_torch[0].numpy(), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------ regularisers: layer norm, zoneout, DropConnect


def _with_layer_norm(cell, p, rng, coupled=False):
    """The problem with layer-norm gains as inputs (so that finite differences cover them): random around
    their initial values (gains 1, bias 0), so that a wrong gradient cannot hide behind a one."""
    G = 3 if coupled else GATES[cell]
    H = p["R"].shape[0] // G
    p = {**p, "gamma_x": 1 + rng.normal(scale=0.3, size=G * H),
         "gamma_h": 1 + rng.normal(scale=0.3, size=G * H)}
    if cell == "lstm":
        p.update(gamma_c=1 + rng.normal(scale=0.3, size=H), beta_c=rng.normal(scale=0.3, size=H))
    return p


def _keep_mask(shape, rng, z=0.3):
    """Zoneout keep factors in training: 1 with probability z, else 0; both present."""
    for _ in range(100):
        d = (rng.random(shape) < z).astype(np.float64)
        if 0 < np.count_nonzero(d) < d.size:
            return d
    raise AssertionError("no mixed zoneout mask in 100 draws")


REGULARISED = [  # (cell, options without arrays, layer norm, zoneout, weight mask)
    ("lstm", {"activation": "tanh"}, True, False, False),
    ("lstm", {"activation": "relu", "coupled_gates": True, "forget_bias": 1.0}, True, False, False),
    ("lstm", {"activation": "tanh"}, False, True, False),
    ("lstm", {"activation": "tanh"}, False, False, True),
    ("lstm", {"activation": "tanh", "cell_clip": CLIP}, True, True, True),
    ("gru", {"reset_after": True, "activation": "tanh"}, True, False, False),
    ("gru", {"reset_after": True, "activation": "relu"}, False, True, True),
    ("gru", {"reset_after": False, "activation": "tanh"}, False, True, True),
    ("gru", {"reset_after": True, "activation": "tanh"}, True, True, True),
    ("rnn", {"activation": "tanh"}, False, False, True),
    ("rnn", {"activation": "relu"}, False, False, True),
]
# with and without peepholes for the LSTM
REGULARISED_CASES = [(*case, peephole) for case in REGULARISED
                     for peephole in ((False, True) if case[0] == "lstm" else (False,))]
REGULARISED_IDS = ["-".join([cell, *(f"{k}={v}" for k, v in o.items())]
                            + [n for n, on in zip(("layer_norm", "zoneout", "weight_mask", "peephole"), flags)
                               if on])
                   for cell, o, *flags in REGULARISED_CASES]


@pytest.mark.parametrize(("cell", "opts", "layer_norm", "zoneout", "weight_mask", "peephole"),
                         REGULARISED_CASES, ids=REGULARISED_IDS)
def test_regularisers_backward_matches_finite_differences(cell, opts, layer_norm, zoneout, weight_mask,
                                                          peephole, rng):
    """Layer norm (its gains among the inputs), zoneout of h and c (training masks) and DropConnect, alone
    and together, with a recurrent mask too, against central finite differences of the reference."""
    T, B, I, H = SIZES
    coupled = opts.get("coupled_gates", False)
    G = 3 if coupled else GATES[cell]
    opts = {**opts, "recurrent_mask": _mask(T, B, H, rng)}
    if zoneout:
        opts["zoneout"] = _keep_mask((T, B, H), rng)
        if cell == "lstm":
            opts["zoneout_cell"] = _keep_mask((T, B, H), rng)
    if weight_mask:
        opts["weight_mask"] = _mask(1, G * H, H, rng)[0]
    for _ in range(100):
        p, seeds = _problem(cell, T, B, I, H, rng, coupled=coupled, peephole=peephole)
        if layer_norm:
            p = _with_layer_norm(cell, p, rng, coupled)
        if _is_valid(cell, {**opts}, p):
            break
    else:
        raise AssertionError("no problem away from the relu kink and the clip bounds in 100 draws")
    _check_against_finite_differences(cell, opts, p, seeds)


def test_layer_norm_normalises_each_row_and_its_gains_scale_it(rng):
    """LN(v) has mean 0 and variance var / (var + 1e-5) per row; the LSTM with unit gains and zero cell bias
    differs from the one without layer norm, and scaling W leaves it unchanged (LN is scale-invariant)."""
    v = rng.normal(size=(3, 8)) * 5 + 2
    out, _ = ref._layer_norm(v, np.ones(8))
    var = v.var(axis=1, keepdims=True)
    np.testing.assert_allclose(out.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=1, keepdims=True), var / (var + 1e-5), rtol=1e-12)
    p, _ = _problem("lstm", 4, 2, 3, 5, rng)
    gains = dict(gamma_x=np.ones(20), gamma_h=np.ones(20), gamma_c=np.ones(5), beta_c=np.zeros(5))
    y, *_ = ref.lstm_forward(**p, **gains)
    y_plain, *_ = ref.lstm_forward(**p)
    assert np.abs(y - y_plain).max() > 1e-3
    y_scaled, *_ = ref.lstm_forward(**{**p, "W": 10.0 * p["W"]}, **gains)
    # Equal up to the 1e-5 beside the variance: W x has a variance of about 0.02 per row here, so the outputs
    # move by about 1e-5 / (2 * 0.02); without layer norm they move by far more.
    assert np.abs(y_scaled - y).max() < 1e-3
    assert np.abs(ref.lstm_forward(**{**p, "W": 10.0 * p["W"]})[0] - y_plain).max() > 0.1


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_zoneout_keeps_the_state_where_its_mask_is_one(cell, rng):
    """Keep factors 0 everywhere are no zoneout; 1 everywhere keep h0 (and c0) for every step; in evaluation
    the factor z mixes the previous state and the new one."""
    T, B, I, H = SIZES
    p, _ = _problem(cell, T, B, I, H, rng)
    forward = ref.lstm_forward if cell == "lstm" else ref.gru_forward
    zeros, ones = np.zeros((T, B, H)), np.ones((T, B, H))
    cell_keep = (lambda d: {"zoneout_cell": d}) if cell == "lstm" else (lambda d: {})
    plain = forward(**p)
    np.testing.assert_array_equal(forward(**p, zoneout=zeros, **cell_keep(zeros))[0], plain[0])
    frozen = forward(**p, zoneout=ones, **cell_keep(ones))
    np.testing.assert_array_equal(frozen[0], np.broadcast_to(p["h0"], (T, B, H)))
    if cell == "lstm":
        np.testing.assert_array_equal(frozen[2], p["c0"])
    evaluation = np.full((1, B, H), 0.3)
    first = forward(**{**p, "x": p["x"][:1]}, zoneout=evaluation, **cell_keep(evaluation))
    step = forward(**{**p, "x": p["x"][:1]})
    np.testing.assert_allclose(first[0][0], 0.3 * p["h0"] + 0.7 * step[0][0], rtol=1e-14)


def test_weight_mask_is_dropconnect_on_R(rng):
    """A weight mask M runs the cell on R * M; dR is M times the gradient of R * M."""
    T, B, I, H = SIZES
    p, seeds = _problem("lstm", T, B, I, H, rng)
    M = _mask(1, 4 * H, H, rng)[0]
    masked = ref.lstm_forward(**p, weight_mask=M)
    on_product = ref.lstm_forward(**{**p, "R": p["R"] * M})
    np.testing.assert_array_equal(masked[0], on_product[0])
    g = ref.lstm_backward(masked[3], seeds["dy"], seeds["dh_T"], seeds["dc_T"])
    g_product = ref.lstm_backward(on_product[3], seeds["dy"], seeds["dh_T"], seeds["dc_T"])
    np.testing.assert_allclose(g[4], M * g_product[4], rtol=1e-14)
    np.testing.assert_allclose(g[0], g_product[0], rtol=1e-14)


def test_regularisers_with_a_projection_match_finite_differences(rng):
    """Layer norm, zoneout (of the P units of h, the H of c) and DropConnect ([4H, P]) with a projection."""
    T, B, I, H, P = 4, 2, 3, 5, 3
    p, seeds = _projected_problem(T, B, I, H, P, rng, peephole=True)
    p = _with_layer_norm("lstm", p, rng)
    opts = {"activation": "tanh", "zoneout": _keep_mask((T, B, P), rng),
            "zoneout_cell": _keep_mask((T, B, H), rng), "weight_mask": _mask(1, 4 * H, P, rng)[0],
            "recurrent_mask": _mask(T, B, P, rng)}
    _check_against_finite_differences("lstm", opts, p, seeds)
