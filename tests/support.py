"""Shared test helpers: the per-dtype tolerance table, random problems, and one way to run a window through
Conveyor or through the float64 reference and get the same tuple back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import conveyor

import reference as ref

# |out - ref| <= atol + rtol * |ref|, against the float64 reference, for windows of up to ~40 steps.
TOLERANCES = {
    np.dtype(np.float64): (1e-11, 1e-9),
    np.dtype(np.float32): (5e-5, 5e-4),
}

GATES = {"lstm": 4, "gru": 3, "rnn": 1}

# Every cell and option this version supports, as (cell, keyword options).
CONFIGS = [
    ("lstm", {"activation": "tanh"}),
    ("lstm", {"activation": "relu"}),
    ("gru", {"reset_after": True, "activation": "tanh"}),
    ("gru", {"reset_after": False, "activation": "tanh"}),
    ("gru", {"reset_after": True, "activation": "relu"}),
    ("gru", {"reset_after": False, "activation": "relu"}),
    ("rnn", {"activation": "tanh"}),
    ("rnn", {"activation": "relu"}),
]


def config_id(config) -> str:
    cell, options = config
    return "-".join([cell] + [f"{k}={v}" for k, v in options.items()])


@dataclass
class Problem:
    """One window's inputs and upstream gradients, as float64; `cast` gives them in another dtype."""

    cell: str
    options: dict
    x: np.ndarray
    W: np.ndarray
    R: np.ndarray
    bW: np.ndarray | None
    bR: np.ndarray | None
    h0: np.ndarray | None
    c0: np.ndarray | None
    dy: np.ndarray
    dh_T: np.ndarray | None
    dc_T: np.ndarray | None
    extra: dict = field(default_factory=dict)

    def cast(self, dtype) -> Problem:
        def c(a):
            return None if a is None else np.ascontiguousarray(a, dtype=dtype)

        return Problem(self.cell, self.options, *(c(getattr(self, n)) for n in ARRAY_FIELDS))


ARRAY_FIELDS = ("x", "W", "R", "bW", "bR", "h0", "c0", "dy", "dh_T", "dc_T")


def make_problem(cell, options, T, B, I, H, rng, *, bias=True, initial_state=True, final_grads=True,
                 scale=None) -> Problem:
    """Fresh random inputs (never zeros). Weights scaled like PyTorch's initialisation by default."""
    G = GATES[cell]
    w = 1.0 / np.sqrt(H) if scale is None else scale

    def u(*shape, s=1.0):
        return rng.uniform(-s, s, size=shape)

    lstm = cell == "lstm"
    return Problem(
        cell, options,
        x=u(T, B, I), W=u(G * H, I, s=w), R=u(G * H, H, s=w),
        bW=u(G * H, s=w) if bias else None, bR=u(G * H, s=w) if bias else None,
        h0=u(B, H, s=0.5) if initial_state else None,
        c0=u(B, H, s=0.5) if initial_state and lstm else None,
        dy=u(T, B, H), dh_T=u(B, H) if final_grads else None,
        dc_T=u(B, H) if final_grads and lstm else None,
    )


def run_conveyor(p: Problem):
    """Forward and backward through Conveyor: (y, h_T, c_T or None, grads as a dict)."""
    if p.cell == "lstm":
        y, h_T, c_T, saved = conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0, **p.options)
        g = conveyor.lstm_backward(saved, p.dy, p.dh_T, p.dc_T)._asdict()
        del g["dP"], g["dW_hr"], g["dlayer_norm"]  # no such option here (test_variants.py and others)
    else:
        forward = getattr(conveyor, f"{p.cell}_forward")
        backward = getattr(conveyor, f"{p.cell}_backward")
        y, h_T, saved = forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, **p.options)
        c_T = None
        g = backward(saved, p.dy, p.dh_T)._asdict()
        g.pop("dlayer_norm", None)
    return y, h_T, c_T, g


def _zeros_if_none(a, shape):
    return np.zeros(shape) if a is None else a


def run_reference(p: Problem):
    """The same through the float64 reference (absent states, biases and gradients as zeros)."""
    G, H = GATES[p.cell], p.R.shape[1]
    B = p.x.shape[1]
    bW = _zeros_if_none(p.bW, G * H)
    bR = _zeros_if_none(p.bR, G * H)
    h0 = _zeros_if_none(p.h0, (B, H))
    dh_T = _zeros_if_none(p.dh_T, (B, H))
    if p.cell == "lstm":
        c0 = _zeros_if_none(p.c0, (B, H))
        y, h_T, c_T, cache = ref.lstm_forward(p.x, p.W, p.R, bW, bR, h0, c0, **p.options)
        names = ("dx", "dh0", "dc0", "dW", "dR", "dbW", "dbR")
        grads = ref.lstm_backward(cache, p.dy, dh_T, _zeros_if_none(p.dc_T, (B, H)))[:7]
    else:
        y, h_T, cache = getattr(ref, f"{p.cell}_forward")(p.x, p.W, p.R, bW, bR, h0, **p.options)
        c_T = None
        names = ("dx", "dh0", "dW", "dR", "dbW", "dbR")
        grads = getattr(ref, f"{p.cell}_backward")(cache, p.dy, dh_T)
    g = dict(zip(names, grads))
    if p.bW is None:
        g["dbW"] = None
    if p.bR is None:
        g["dbR"] = None
    return y, h_T, c_T, g


def assert_close(name, got, expected, dtype):
    atol, rtol = TOLERANCES[np.dtype(dtype)]
    assert got is not None, f"{name}: missing"
    assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
    assert got.dtype == np.dtype(dtype), f"{name}: dtype {got.dtype} != {np.dtype(dtype)}"
    assert np.all(np.isfinite(got)), f"{name}: {np.count_nonzero(~np.isfinite(got))} non-finite elements"
    excess = np.abs(got - expected) - (atol + rtol * np.abs(expected))
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (
        f"{name}: at {worst} got {got[worst]!r}, expected {expected[worst]!r} "
        f"(|diff| {abs(got[worst] - expected[worst]):.3g} > atol {atol} + rtol {rtol} * |ref|)")


def assert_all_close(got: dict, expected: dict, dtype):
    """Every result by name: the same names, None where the expected value is None (an absent bias or
    peephole), else assert_close in `dtype`. A name the expectation lacks must be None in `got` (a gradient of
    an option the window did not use, such as dlayer_norm)."""
    for name in set(got) - set(expected):
        assert got[name] is None, f"{name}: expected no value"
    assert set(expected) <= set(got), f"missing: {sorted(set(expected) - set(got))}"
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, f"{name}: expected None"
        else:
            assert_close(name, got[name], value, dtype)
