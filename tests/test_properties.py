"""Property-based tests (hypothesis): random cells, options and shapes on the CPU backend against the float64
reference, forward and backward, in float64.

Each example draws a cell (LSTM, GRU, RNN), its options (activation; GRU reset_after; LSTM peephole, coupled
gates, forget bias, cell clip, a projection of any size), optional recurrent dropout (variational or per step,
any seed and mask stream), whether the biases, the initial state and the final-state gradients are given, and
T, B, I, H down to 1 and at odd sizes. Inputs come from a NumPy generator seeded by a drawn integer. Conveyor
must match the reference within support.TOLERANCES[float64] for y, h_T, c_T and every gradient.

Two legitimate sources of mismatch are assumed away rather than covered by looser tolerances: a relu argument
within KINK of zero (either side of the kink is right) and an unclipped LSTM cell value within KINK of
+-cell_clip (either side of the bound is right). Exact zeros stay in: both sides compute them exactly (an
LSTM with relu and no initial state has c_t == 0 wherever g == 0) and both take relu'(0) = 0, the reference's
convention.

The explicit @examples are regression cases at the edges (no failing example was found while writing this
file; see their comment).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import conveyor

import reference as ref
from support import assert_all_close

DTYPE = np.dtype(np.float64)  # support.TOLERANCES[float64]: atol 1e-11, rtol 1e-9
KINK = 1e-9  # relu arguments and unclipped cell values this close to a kink or a clip bound are skipped
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


@dataclass(frozen=True)
class Case:
    """One drawn example: the cell, its options, the sizes and the seeds (make_arrays draws the arrays)."""

    cell: str
    activation: str
    T: int
    B: int
    I: int
    H: int
    data_seed: int
    reset_after: bool = True  # GRU only
    peephole: bool = False  # LSTM only, and the next three
    coupled_gates: bool = False
    forget_bias: float = 0.0
    cell_clip: float | None = None
    proj_size: int | None = None
    dropout: float = 0.0
    variational: bool = True
    seed: int = 0
    mask_stream: int = 0
    bias: bool = True
    initial_state: bool = True
    final_grads: bool = True


@st.composite
def cases(draw):
    cell = draw(st.sampled_from(["lstm", "gru", "rnn"]))
    kwargs = dict(
        cell=cell,
        activation=draw(st.sampled_from(["tanh", "relu"])),
        T=draw(st.integers(1, 6)), B=draw(st.integers(1, 5)), I=draw(st.integers(1, 7)),
        H=draw(st.integers(1, 9)),
        data_seed=draw(st.integers(0, 2**32 - 1)),
        bias=draw(st.booleans()), initial_state=draw(st.booleans()), final_grads=draw(st.booleans()),
    )
    if cell == "gru":
        kwargs["reset_after"] = draw(st.booleans())
    if cell == "lstm":
        kwargs.update(peephole=draw(st.booleans()), coupled_gates=draw(st.booleans()),
                      forget_bias=draw(st.sampled_from([0.0, 1.0])),
                      cell_clip=draw(st.sampled_from([None, 0.5, 3.0])),
                      proj_size=draw(st.one_of(st.none(), st.integers(1, 9))))
    q = draw(st.sampled_from([0.0, 0.3]))
    if q > 0:
        kwargs.update(dropout=q, variational=draw(st.booleans()), seed=draw(st.integers(0, 2**64 - 1)),
                      mask_stream=draw(st.integers(0, 2**64 - 1)))
    return Case(**kwargs)


def make_arrays(c: Case) -> dict:
    """Random float64 inputs and upstream gradients (never zeros): uniform in [-1, 1], weights and biases
    scaled by 1/sqrt(H), states and peephole weights in [-0.5, 0.5]; absent ones are None."""
    rng = np.random.default_rng(c.data_seed)
    G = 3 if c.coupled_gates else GATES[c.cell]
    w = 1.0 / np.sqrt(c.H)
    lstm = c.cell == "lstm"
    S = units(c)

    def u(shape, s=1.0):
        return rng.uniform(-s, s, size=shape)

    return dict(
        x=u((c.T, c.B, c.I)), W=u((G * c.H, c.I), w), R=u((G * c.H, S), w),
        bW=u(G * c.H, w) if c.bias else None, bR=u(G * c.H, w) if c.bias else None,
        h0=u((c.B, S), 0.5) if c.initial_state else None,
        c0=u((c.B, c.H), 0.5) if c.initial_state and lstm else None,
        P=u((3, c.H), 0.5) if c.peephole else None,
        W_hr=u((S, c.H), w) if c.proj_size else None,
        dy=u((c.T, c.B, S)), dh_T=u((c.B, S)) if c.final_grads else None,
        dc_T=u((c.B, c.H)) if c.final_grads and lstm else None,
    )


def units(c: Case) -> int:
    """The units of h: the projection's, or H."""
    return c.proj_size or c.H


def run_conveyor(c: Case, a: dict, lengths=None) -> dict:
    dropout = dict(recurrent_dropout=c.dropout, variational=c.variational, seed=c.seed,
                   mask_stream=c.mask_stream, lengths=lengths)
    if c.cell == "lstm":
        y, h_T, c_T, saved = conveyor.lstm_forward(
            a["x"], a["W"], a["R"], a["bW"], a["bR"], a["h0"], a["c0"], P=a["P"], W_hr=a["W_hr"],
            coupled_gates=c.coupled_gates, forget_bias=c.forget_bias, cell_clip=c.cell_clip,
            activation=c.activation, **dropout)
        grads = conveyor.lstm_backward(saved, a["dy"], a["dh_T"], a["dc_T"])._asdict()
        return {"y": y, "h_T": h_T, "c_T": c_T, **grads}
    options = dict(activation=c.activation, **dropout)
    if c.cell == "gru":
        options["reset_after"] = c.reset_after
    forward, backward = getattr(conveyor, f"{c.cell}_forward"), getattr(conveyor, f"{c.cell}_backward")
    y, h_T, saved = forward(a["x"], a["W"], a["R"], a["bW"], a["bR"], a["h0"], **options)
    grads = backward(saved, a["dy"], a["dh_T"])._asdict()
    return {"y": y, "h_T": h_T, **grads}


def recurrent_mask(c: Case):
    """The recurrent dropout mask [T, B, units] of the example, or None."""
    if not c.dropout:
        return None
    return ref.dropout_mask(c.dropout, c.variational, c.seed, c.mask_stream, (c.T, c.B, units(c)))


def run_reference(c: Case, a: dict, mask="drawn") -> tuple[dict, dict]:
    """The reference's outputs and gradients (absent arrays as zeros, absent bias gradients as None), and its
    cache. ``mask``: the example's own recurrent dropout mask, or the one given."""
    G = 3 if c.coupled_gates else GATES[c.cell]
    B, H, S = c.B, c.H, units(c)

    def given_or_zeros(name, shape):
        return np.zeros(shape) if a[name] is None else a[name]

    bW, bR = given_or_zeros("bW", G * H), given_or_zeros("bR", G * H)
    h0, dh_T = given_or_zeros("h0", (B, S)), given_or_zeros("dh_T", (B, S))
    mask = recurrent_mask(c) if isinstance(mask, str) else mask
    if c.cell == "lstm":
        y, h_T, c_T, cache = ref.lstm_forward(
            a["x"], a["W"], a["R"], bW, bR, h0, given_or_zeros("c0", (B, H)), c.activation, peephole=a["P"],
            coupled_gates=c.coupled_gates, forget_bias=c.forget_bias, cell_clip=c.cell_clip,
            recurrent_mask=mask, projection=a["W_hr"])
        names = ("dx", "dh0", "dc0", "dW", "dR", "dbW", "dbR", "dP", "dW_hr")
        grads = ref.lstm_backward(cache, a["dy"], dh_T, given_or_zeros("dc_T", (B, H)))
        out = {"y": y, "h_T": h_T, "c_T": c_T, **dict(zip(names, grads))}
    else:
        if c.cell == "gru":
            y, h_T, cache = ref.gru_forward(a["x"], a["W"], a["R"], bW, bR, h0, c.reset_after, c.activation,
                                            recurrent_mask=mask)
        else:
            y, h_T, cache = ref.rnn_forward(a["x"], a["W"], a["R"], bW, bR, h0, c.activation,
                                            recurrent_mask=mask)
        names = ("dx", "dh0", "dW", "dR", "dbW", "dbR")
        grads = getattr(ref, f"{c.cell}_backward")(cache, a["dy"], dh_T)
        out = {"y": y, "h_T": h_T, **dict(zip(names, grads))}
    if a["bW"] is None:
        out["dbW"] = None
    if a["bR"] is None:
        out["dbR"] = None
    return out, cache


def near_nonzero(values, target, tol=KINK) -> bool:
    """Whether any value lies within tol of target without being exactly on it."""
    distance = np.abs(np.asarray(values) - target)
    return bool(np.any((distance > 0) & (distance < tol)))


def on_a_kink(c: Case, cache: dict) -> bool:
    """Whether the example sits where float64 rounding may legitimately pick the other side of a kink."""
    if c.activation == "relu":
        relu_arguments = [v for k, v in cache.items() if k.startswith("pre_")]
        if c.cell == "lstm":
            relu_arguments.append(cache["cs"][1:])  # h_t = o * act(c_t)
        if any(near_nonzero(v, 0.0) for v in relu_arguments):
            return True
    if c.cell_clip is not None:
        unclipped = cache["c_unclipped"]
        return near_nonzero(unclipped, c.cell_clip) or near_nonzero(unclipped, -c.cell_clip)
    return False


# Regression examples at the edges. None of them failed, and no failing example was found while developing
# this file; they pin cases that the derandomized draw of 60 may miss:
# - every size 1 with every LSTM option at once: relu, peephole, coupled gates, forget bias, a cell clip that
#   acts (c_1 = 0.66 is clipped to 0.5), per-step dropout;
# - odd sizes for a GRU with reset before the product (the r * h_{t-1} recurrent input) and relu, without
#   bias, initial state or final-state gradients;
# - odd sizes for a coupled-gate LSTM with the wide clip (3.0) and variational dropout from the largest seed
#   and mask stream, without an initial state.
@given(case=cases())
@example(case=Case("lstm", "relu", T=1, B=1, I=1, H=1, data_seed=4, peephole=True, coupled_gates=True,
                   forget_bias=1.0, cell_clip=0.5, dropout=0.3, variational=False, seed=7, mask_stream=3))
@example(case=Case("gru", "relu", T=5, B=3, I=7, H=9, data_seed=2, reset_after=False, bias=False,
                   initial_state=False, final_grads=False))
@example(case=Case("lstm", "tanh", T=3, B=5, I=7, H=9, data_seed=3, coupled_gates=True, cell_clip=3.0,
                   dropout=0.3, variational=True, seed=2**64 - 1, mask_stream=2**64 - 1, initial_state=False))
@settings(max_examples=60, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_matches_the_reference(case):
    arrays = make_arrays(case)
    expected, cache = run_reference(case, arrays)
    assume(not on_a_kink(case, cache))
    assert_all_close(run_conveyor(case, arrays), expected, DTYPE)


def row_alone(c: Case, a: dict, b: int, steps: int) -> tuple[Case, dict]:
    """Row b of the example on its first `steps` steps, as an example of its own (B = 1)."""
    def take(name, index):
        return None if a[name] is None else np.ascontiguousarray(a[name][index])

    row = {name: take(name, (slice(steps), slice(b, b + 1))) for name in ("x", "dy")}
    row.update({name: take(name, slice(b, b + 1)) for name in ("h0", "c0", "dh_T", "dc_T")})
    row.update({name: a[name] for name in ("W", "R", "bW", "bR", "P", "W_hr")})
    return dataclasses.replace(c, T=steps, B=1), row


@given(case=cases(), lengths_seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=4000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_lengths_match_the_reference_row_by_row(case, lengths_seed):
    """With random lengths (1 .. T, in any order), each row equals the reference run on that row alone for
    its own steps, with its own slice of the batch's dropout mask; y and dx are 0 past each length, and the
    parameter gradients are the rows' sums."""
    arrays = make_arrays(case)
    lengths = np.random.default_rng(lengths_seed).integers(1, case.T + 1, size=case.B)
    got = run_conveyor(case, arrays, lengths)
    mask = recurrent_mask(case)
    sums = {}
    for b, n in enumerate(lengths):
        row_case, row = row_alone(case, arrays, b, int(n))
        expected, cache = run_reference(row_case, row, None if mask is None else mask[:n, b:b + 1])
        assume(not on_a_kink(row_case, cache))
        per_row = {"y": got["y"][:n, b:b + 1], "dx": got["dx"][:n, b:b + 1]}
        per_row.update({name: got[name][b:b + 1] for name in ("h_T", "c_T", "dh0", "dc0") if name in got})
        assert_all_close(per_row, {name: expected[name] for name in per_row}, DTYPE)
        assert not np.any(got["y"][n:, b]) and not np.any(got["dx"][n:, b])
        for name in ("dW", "dR", "dbW", "dbR", "dP", "dW_hr"):
            if expected.get(name) is not None:
                sums[name] = sums.get(name, 0) + expected[name]
    assert_all_close({name: got[name] for name in sums}, sums, DTYPE)
