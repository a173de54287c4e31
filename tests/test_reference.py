"""Checks of the float64 reference (tests/reference.py): its backward against central finite differences,
its forward against a hand-written single step and, when torch is installed, against torch.nn."""

import numpy as np
import pytest

import reference as ref
from support import CONFIGS, config_id

EPS = 1e-6  # central finite-difference step
RELU_MARGIN = 1e-3  # every relu argument stays this far from its kink, so a step of EPS never crosses it

CONFIG_IDS = [config_id(c) for c in CONFIGS]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _problem(cell, T, B, input_size, H, rng, scale=0.5):
    """Random inputs and random nonzero output gradients for one window."""
    G = GATES[cell]
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
    return p, seeds


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
        names = ("x", "h0", "c0", "W", "R", "bW", "bR")
        return dict(zip(names, ref.lstm_backward(cache, seeds["dy"], seeds["dh_T"], seeds["dc_T"])))
    backward = ref.gru_backward if cell == "gru" else ref.rnn_backward
    return dict(zip(("x", "h0", "W", "R", "bW", "bR"), backward(cache, seeds["dy"], seeds["dh_T"])))


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


def _valid_problem(cell, opts, sizes, seed):
    """A random problem; for relu cells, the first seed from `seed` on whose relu arguments avoid the kink."""
    for s in range(seed, seed + 100):
        p, seeds = _problem(cell, *sizes, np.random.default_rng(s))
        if opts["activation"] == "tanh":
            return p, seeds
        _, _, cache = _forward(cell, opts, p)
        if min(np.abs(a).min() for a in _relu_arguments(cell, cache)) > RELU_MARGIN:
            return p, seeds
    raise AssertionError("no relu problem away from the kink in 100 seeds")


@pytest.mark.parametrize("sizes", [(3, 2, 3, 4), (1, 1, 3, 4)], ids=["T3B2I3H4", "T1B1I3H4"])
@pytest.mark.parametrize(("cell", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_backward_matches_finite_differences(cell, opts, sizes):
    p, seeds = _valid_problem(cell, opts, sizes, seed=1234)
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


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


@pytest.mark.parametrize(("cell", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_single_step_matches_spec(cell, opts):
    p, _ = _problem(cell, 1, 3, 5, 4, np.random.default_rng(7))
    act = np.tanh if opts["activation"] == "tanh" else (lambda v: np.maximum(v, 0.0))
    x, h0 = p["x"][0], p["h0"]
    G = GATES[cell]
    Ws, Rs = np.split(p["W"], G), np.split(p["R"], G)
    bWs, bRs = np.split(p["bW"], G), np.split(p["bR"], G)

    def pre(k):
        return x @ Ws[k].T + bWs[k] + h0 @ Rs[k].T + bRs[k]

    if cell == "lstm":
        i, f, g, o = _sigmoid(pre(0)), _sigmoid(pre(1)), act(pre(2)), _sigmoid(pre(3))
        c = f * p["c0"] + i * g
        expected = (o * act(c), c)
    elif cell == "gru":
        r, z = _sigmoid(pre(0)), _sigmoid(pre(1))
        if opts["reset_after"]:
            n = act(x @ Ws[2].T + bWs[2] + r * (h0 @ Rs[2].T + bRs[2]))
        else:
            n = act(x @ Ws[2].T + bWs[2] + (r * h0) @ Rs[2].T + bRs[2])
        expected = ((1.0 - z) * n + z * h0,)
    else:
        expected = (act(pre(0)),)

    y, states, _ = _forward(cell, opts, p)
    np.testing.assert_allclose(y[0], expected[0], rtol=1e-13, atol=1e-15)
    for got, want in zip(states, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


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
    for got, want in zip(states2, states, strict=True):
        np.testing.assert_array_equal(got, want)


def test_bad_arguments_raise_value_error():
    p, _ = _problem("rnn", 2, 2, 3, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"^activation:"):
        ref.rnn_forward(**p, activation="sigmoid")
    with pytest.raises(ValueError, match=r"^W:"):
        ref.rnn_forward(**{**p, "W": p["W"][:, :2]})
    with pytest.raises(ValueError, match=r"^h0:"):
        ref.rnn_forward(**{**p, "h0": p["h0"][:1]})


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
    for got, want in zip(states, states_torch, strict=True):
        np.testing.assert_allclose(got, want[0].numpy(), rtol=1e-12, atol=1e-14)
