"""State dicts between Haste (lmnt-com/haste) and Conveyor.

Haste's ``LSTM``/``LayerNormLSTM`` and ``GRU``/``LayerNormGRU`` (one layer, one direction) keep ``kernel``
``[I, G*H]`` and ``recurrent_kernel`` ``[H, G*H]`` (the transposes of Conveyor's ``weight_ih_l0`` and
``weight_hh_l0``), gate blocks in their own order (LSTM ``i, g, f, o``; GRU ``z, r, h``, where Conveyor has
``i, f, g, o`` and ``r, z, n``), one ``bias`` (the LSTM) or ``bias`` and ``recurrent_bias`` (the GRU), and
with layer normalisation ``gamma`` ``[2, G*H]`` (the gains of the input and of the recurrent product) and the
LSTM's ``gamma_h``, ``beta_h`` ``[H]`` (the cell's gain and bias). The equations agree (docs/math.md,
"Regularisers"): Conveyor's ``layer_norm=True`` with these weights gives Haste's outputs, and Haste's
``zoneout`` is Conveyor's ``zoneout`` of h. :func:`from_haste` returns Conveyor's names for
``conveyor.LSTM/GRU`` and ``conveyor.torch.LSTM/GRU``; :func:`to_haste` goes back (the LSTM's two biases
summed into Haste's one). Arrays stay of their library (NumPy or PyTorch).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["from_haste", "to_haste"]

# Conveyor's gate blocks taken from Haste's: Conveyor block k is Haste block ORDER[k]; the orders are their
# own inverses.
_ORDER = {"lstm": (0, 2, 1, 3), "gru": (1, 0, 2)}


def _cat(parts):
    if hasattr(parts[0], "detach"):  # torch
        import torch

        return torch.cat(parts)
    return np.concatenate(parts)


def _blocks(a, order):
    """a's gate blocks (along its first axis) in `order`."""
    size = a.shape[0] // len(order)
    return _cat([a[k * size:(k + 1) * size] for k in order])


def _check(state, cell, names):
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping of parameter names to arrays, got {type(state).__name__}")
    if cell not in _ORDER:
        raise ValueError(f"cell: expected 'lstm' or 'gru', got {cell!r}")
    missing = [name for name in names if name not in state]
    if missing:
        raise ValueError(f"state: missing {missing} for a Haste {cell} (has {sorted(state)})")


def from_haste(state, cell="lstm") -> dict:
    """Conveyor's state dict (one layer, suffix ``_l0``) from a Haste layer's ``state_dict()``."""
    names = ["kernel", "recurrent_kernel", "bias"] + (["recurrent_bias"] if cell == "gru" else [])
    _check(state, cell, names)
    order = _ORDER[cell]
    out = {"weight_ih_l0": _blocks(state["kernel"].T, order),
           "weight_hh_l0": _blocks(state["recurrent_kernel"].T, order),
           "bias_ih_l0": _blocks(state["bias"], order)}
    out["bias_hh_l0"] = _blocks(state["recurrent_bias"], order) if cell == "gru" else out["bias_ih_l0"] * 0
    if "gamma" in state:
        out["layernorm_x_l0"] = _blocks(state["gamma"][0], order)
        out["layernorm_h_l0"] = _blocks(state["gamma"][1], order)
        if cell == "lstm":
            _check(state, cell, ["gamma_h", "beta_h"])
            out["layernorm_c_weight_l0"] = state["gamma_h"]
            out["layernorm_c_bias_l0"] = state["beta_h"]
    return out


def to_haste(state, cell="lstm") -> dict:
    """A Haste layer's state dict from Conveyor's (one layer, one direction; with layer norm if it has the
    gains)."""
    _check(state, cell, ["weight_ih_l0", "weight_hh_l0"])
    order = _ORDER[cell]
    out = {"kernel": _blocks(state["weight_ih_l0"], order).T,
           "recurrent_kernel": _blocks(state["weight_hh_l0"], order).T}
    bias_ih, bias_hh = state.get("bias_ih_l0"), state.get("bias_hh_l0")
    if bias_ih is not None:
        if cell == "lstm":
            out["bias"] = _blocks(bias_ih + bias_hh, order)
        else:
            out["bias"], out["recurrent_bias"] = _blocks(bias_ih, order), _blocks(bias_hh, order)
    if "layernorm_x_l0" in state:
        gains = [_blocks(state["layernorm_x_l0"], order), _blocks(state["layernorm_h_l0"], order)]
        out["gamma"] = _cat([g[None] for g in gains])
        if cell == "lstm":
            out["gamma_h"], out["beta_h"] = state["layernorm_c_weight_l0"], state["layernorm_c_bias_l0"]
    return out
