"""The CPU backend's cell loops run in two compiled copies where the processor has AVX-512
(csrc/cpu/recurrence.cpp, over_units): a row's units up to its last whole 64-byte vector in 512-bit vectors,
the units after them in 256-bit ones. A unit's results must not depend on which copy ran it.

Two layers share their first H_SMALL units, and nothing of the wider layer's other units reaches them (their
columns of R are zero, and so are their output gradients). With H_SMALL = 20, units 16-19 are past the narrow
layer's last whole vector (of 16 floats or 8 doubles) and run in the 256-bit copy; in the wide layer
(H_WIDE = 36) they run in the 512-bit one. Forward and backward, every shared unit's outputs and gradients
must be the same bits in both layers, and the narrow layer must match the float64 reference. Without AVX-512
one copy runs every unit, and this holds as well."""

import numpy as np
import pytest
from test_unit_groups import assert_same_bits, on_threads
from test_variants import LSTM_OPTIONS, lstm_id, lstm_problem, reference_lstm, run_lstm

from support import (
    CONFIGS,
    GATES,
    assert_all_close,
    assert_close,
    config_id,
    make_problem,
    run_conveyor,
    run_reference,
)

T, B, I = 3, 5, 7
H_SMALL, H_WIDE = 20, 36


def shared_rows(G, H):
    """The rows of W, R and the biases that belong to the first H_SMALL units of a layer of H units."""
    return np.concatenate([np.arange(g * H, g * H + H_SMALL) for g in range(G)])


def isolate_shared_units(arrays):
    """Cuts what the wide layer's other units send to the shared ones: their columns of R, their gradients."""
    arrays["R"][:, H_SMALL:] = 0.0
    for name in ("dy", "dh_T", "dc_T"):
        if arrays.get(name) is not None:
            arrays[name][..., H_SMALL:] = 0.0


def narrowed(arrays, G):
    """The layer of the first H_SMALL units of the wide one."""
    rows = shared_rows(G, H_WIDE)
    out = {}
    for name, a in arrays.items():
        if a is None:
            out[name] = None
        elif name in ("W", "bW", "bR"):
            out[name] = a[rows].copy()
        elif name == "R":
            out[name] = a[rows][:, :H_SMALL].copy()
        elif name == "x":
            out[name] = a.copy()
        else:  # states, output gradients, peepholes: units last
            out[name] = a[..., :H_SMALL].copy()
    return out


def shared_part(results, G):
    """The wide layer's results for the shared units, laid out as the narrow layer's."""
    rows = shared_rows(G, H_WIDE)
    out = {}
    for name, a in results.items():
        if a is None or name == "dx":
            out[name] = a
        elif name in ("dW", "dbW", "dbR"):
            out[name] = a[rows]
        elif name == "dR":
            out[name] = a[rows][:, :H_SMALL]
        else:
            out[name] = a[..., :H_SMALL]
    return out


PROBLEM_FIELDS = ("x", "W", "R", "bW", "bR", "h0", "c0", "dy", "dh_T", "dc_T")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_a_unit_gives_the_same_bits_in_either_copy(config, dtype, rng):
    cell, options = config
    G = GATES[cell]
    wide = make_problem(cell, options, T, B, I, H_WIDE, rng)
    arrays = {name: getattr(wide, name) for name in PROBLEM_FIELDS}
    isolate_shared_units(arrays)
    small = make_problem(cell, options, T, B, I, H_SMALL, rng)
    for name, a in narrowed(arrays, G).items():
        setattr(small, name, a)

    def results(p):
        y, h_T, c_T, grads = on_threads(1, lambda: run_conveyor(p.cast(dtype)))
        return {"y": y, "h_T": h_T, "c_T": c_T, **grads}

    got = results(small)
    assert_same_bits(got, shared_part(results(wide), G))
    if dtype == np.float64:
        ry, rh_T, rc_T, rgrads = run_reference(small)
        assert_close("y", got["y"], ry, dtype)
        assert_close("h_T", got["h_T"], rh_T, dtype)
        if cell == "lstm":
            assert_close("c_T", got["c_T"], rc_T, dtype)
        for name, expected in rgrads.items():
            assert_close(name, got[name], expected, dtype)


# Peepholes, coupled gates, the forget bias and the clip: the LSTM's row loops have a copy for each.
LSTM_ROW_OPTIONS = [o for o in LSTM_OPTIONS if o["proj_size"] is None and o["activation"] == "tanh"]


@pytest.mark.parametrize("o", LSTM_ROW_OPTIONS, ids=lstm_id)
def test_lstm_options_give_the_same_bits_in_either_copy(o, rng):
    G = 3 if o["coupled_gates"] else 4
    arrays = lstm_problem(o, T, B, I, H_WIDE, rng)
    isolate_shared_units(arrays)
    small = narrowed(arrays, G)
    for dtype in (np.float32, np.float64):
        got = on_threads(1, lambda dtype=dtype: run_lstm(small, o, dtype))
        wide = on_threads(1, lambda dtype=dtype: run_lstm(arrays, o, dtype))
        assert_same_bits(got, shared_part(wide, G))
    expected, _ = reference_lstm(small, o)
    assert_all_close(got, expected, np.float64)
