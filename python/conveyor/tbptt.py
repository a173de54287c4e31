"""Truncated backpropagation through time (docs/math.md, "Truncated BPTT"; Williams & Peng 1990).

``TBPTT(layer, k1, k2)`` walks a long sequence (or a batch of streams) through a layer object k1 steps at a
time. Each ``forward`` carries the final state of the previous one in as a value, so that windows of any
length give exactly the outputs of one call over the whole sequence. Each ``backward`` takes the gradient of
the loss on those k1 steps and backpropagates it through the last k2 >= k1 steps: no gradient crosses
further back. The layer's parameter gradients (``layer.grads``) are those of the span.

Nothing is recomputed: the forward runs in sub-windows of gcd(k1, k2) steps and keeps the last k2 steps'
saved values, so a backward walks back over the sub-windows it needs, newest first; a sub-window that later
spans still reach is backpropagated through again (TBPTT(k1, k2) does that work by definition), but its
forward is never run twice.

Streams of documents: ``forward(x, reset=mask)`` (mask ``[n, B]``, true where row b starts a new document at
that step) puts the row's state back to the initial state (zeros) before that step, and no gradient crosses
the boundary. A sub-window is cut at every step where some row resets, so the state handed in there is
the carried one with those rows zeroed: both backends run it as any other window.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from . import _stack
from ._functional import Saved

__all__ = ["TBPTT"]


def _steps(name, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive integer number of steps, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive integer number of steps, got {value}")
    return int(value)


def _reset_mask(reset, n, batch):
    """`reset` as a host NumPy bool array [n, B] (None stays None), checked."""
    if reset is None:
        return None
    if hasattr(reset, "detach"):  # torch
        reset = reset.detach().cpu().numpy()
    elif hasattr(reset, "get") and type(reset).__module__.startswith("cupy"):
        reset = reset.get()
    mask = np.asarray(reset)
    if mask.dtype != np.bool_:
        raise TypeError(f"reset: expected an array of booleans [n, B], got dtype {mask.dtype}")
    if mask.shape != (n, batch):
        raise ValueError(f"reset: expected shape {(n, batch)} = (steps of x, B), got {mask.shape}")
    return mask


def _zero_rows(ops, rows, states):
    """States [L, B, H] (None stays None) with the batch rows where `rows` is true set to zero."""
    if states is None:
        return None
    keep = ops.asarray((~rows).astype(np.float64)[None, :, None], like=states)
    return ops.contiguous(states * keep)


class TBPTT:
    """Drives ``layer`` (a one-way ``conveyor.LSTM``, ``GRU`` or ``RNN`` of any ``num_layers``: a
    bidirectional layer cannot carry its state forward in time) with TBPTT(k1, k2).

    ``forward(x, reset=None)``: x ``[n, B, input_size]`` with n <= k1 (the last window of a sequence may be
    shorter); returns ``y`` ``[n, B, hidden_size]``. ``reset``: None, or ``[n, B]`` booleans (any library),
    true where row b starts a new document at that step: its state goes back to zeros first, and its
    gradient stops there. ``backward(dy)``: dy for those n steps; returns ``dx`` for every
    step of the span it went back over (the last ``span`` steps, at most k2, oldest first), and leaves the
    parameter gradients of the span in ``layer.grads``. ``state`` holds the carried ``(h, c)`` (c None but for
    the LSTM); ``reset()`` forgets it and the history, as at the start of a new sequence.
    """

    def __init__(self, layer, k1, k2=None):
        if getattr(layer, "bidirectional", False):
            raise ValueError("layer: a bidirectional layer reads the whole sequence backwards, so its state "
                             "cannot be carried from window to window; use a one-way layer")
        if not hasattr(layer, "_weights"):
            raise TypeError(f"layer: expected a conveyor.LSTM, GRU or RNN, got {type(layer).__name__}")
        self.layer = layer
        self.k1 = _steps("k1", k1)
        self.k2 = self.k1 if k2 is None else _steps("k2", k2)
        if self.k2 < self.k1:
            raise ValueError(f"k2: expected k2 >= k1 = {self.k1}, got {self.k2}")
        self.piece = math.gcd(self.k1, self.k2)
        # (StackSaved, steps, reset rows or None) of the sub-windows in the last k2 steps, oldest first; the
        # reset rows are those whose state was zeroed on entry, where backward's gradient stops.
        self._history = deque()
        self._latest = 0  # steps of the last forward, to which backward's dy belongs
        self.state = (None, None)

    @property
    def span(self) -> int:
        """The steps a backward now goes back over."""
        return sum(entry[1] for entry in self._history)

    def reset(self) -> None:
        self._history.clear()
        self._latest = 0
        self.state = (None, None)

    def forward(self, x, reset=None):
        n = x.shape[0] if hasattr(x, "shape") and len(x.shape) == 3 else None
        if n is None:
            raise ValueError(f"x: expected an array [n, B, input_size], got {getattr(x, 'shape', type(x))}")
        if not 1 <= n <= self.k1:
            raise ValueError(f"x: expected at most k1 = {self.k1} steps, got {n}")
        reset = _reset_mask(reset, n, x.shape[1])
        layer = self.layer
        ops = _stack._Ops(x)
        outputs = []
        h, c = self.state
        for start, end in self._segments(n, reset):
            rows = None if reset is None or not reset[start].any() else reset[start]
            if rows is not None and h is not None:
                h, c = _zero_rows(ops, rows, h), _zero_rows(ops, rows, c)
            y, h, c, saved = layer._window(x[start:end], h, c)
            outputs.append(y)
            if layer.training:
                self._history.append((saved, end - start, rows))
                while self.span > self.k2:
                    self._history.popleft()
        self.state = (h, c)
        self._latest = n if layer.training else 0
        if len(outputs) == 1:
            return outputs[0]
        return _stack._Ops(outputs[0]).concat_time(outputs)

    def backward(self, dy):
        if self._latest == 0:
            raise ValueError("backward: no training forward to go back from (call forward in training mode "
                             "first; each forward serves one backward)")
        layer = self.layer
        expected = (self._latest,) + tuple(self.state[0].shape[1:])
        if not hasattr(dy, "shape") or tuple(dy.shape) != expected:
            raise ValueError(f"dy: expected shape {expected} (the steps of the last forward), "
                             f"got {getattr(dy, 'shape', type(dy).__name__)}")
        ops = _stack._Ops(dy)
        pending = self._latest  # the newest steps, whose dy is given; older ones get zeros
        dh = dc = None
        grads, dxs = None, []
        for saved, steps, rows in reversed(self._history):
            if pending > 0:
                d = dy[pending - steps:pending]
                pending -= steps
            else:
                d = ops.zeros((steps,) + tuple(dy.shape[1:]), dy)
            g = _stack.stack_backward(saved, ops.contiguous(d), dh, dc, _keep=True)
            dh, dc = g.dh0, g.dc0
            if rows is not None:  # those rows entered this sub-window from zeros: nothing flows further back
                dh, dc = _zero_rows(ops, rows, dh), _zero_rows(ops, rows, dc)
            dxs.append(g.dx)
            named = layer._named_grads(g)
            grads = named if grads is None else {name: grads[name] + value for name, value in named.items()}
        self._latest = 0
        layer.grads = grads
        dxs.reverse()
        return dxs[0] if len(dxs) == 1 else ops.concat_time(dxs)

    def _segments(self, n, reset):
        """The sub-windows of n steps: pieces of gcd(k1, k2) steps, cut again at every step (but a piece's
        first) where some row resets."""
        for start in range(0, n, self.piece):
            end = min(n, start + self.piece)
            cuts = [start] + ([] if reset is None else [t for t in range(start + 1, end) if reset[t].any()])
            yield from zip(cuts, cuts[1:] + [end])

    # -- checkpoints ------------------------------------------------------------------------------------
    def export_history(self):
        """What a checkpoint needs to resume TBPTT exactly: the saved values of the sub-windows a later
        backward still reaches (computed with the parameters of their time, which a replay could not give
        back) as ``(arrays, info)``; ``import_history`` rebuilds them around the layer's current
        parameters."""
        arrays, info = {}, []
        for i, (saved, steps, rows) in enumerate(self._history):
            windows = []
            for k, w in enumerate(saved.saved):
                for name in ("x", "h0", "c0", "y", "cache"):
                    if getattr(w, name) is not None:
                        arrays[f"{i}.{k}.{name}"] = getattr(w, name)
                windows.append({"options": w.options, "has_bW": w.has_bW, "has_bR": w.has_bR})
            for m, mask in enumerate(saved.masks):
                if mask is not None:
                    arrays[f"{i}.mask.{m}"] = mask
            info.append({"steps": steps, "windows": windows, "masks": [m is not None for m in saved.masks],
                         "reset": None if rows is None else [bool(r) for r in rows]})
        return arrays, info

    def import_history(self, arrays, info) -> None:
        layer = self.layer
        weights = layer._weights()
        self._history.clear()
        for i, entry in enumerate(info):
            windows = []
            for k, w in enumerate(entry["windows"]):
                W, R, bW, bR, *rest = weights[k]
                extra = _stack.window_extras(layer._cell, rest)
                windows.append(Saved(layer._cell, w["options"], arrays[f"{i}.{k}.x"], W, R,
                                     bW if w["has_bW"] else None, bR if w["has_bR"] else None,
                                     arrays.get(f"{i}.{k}.h0"), arrays.get(f"{i}.{k}.c0"), extra.get("P"),
                                     extra.get("W_hr"), extra.get("layer_norm"), arrays[f"{i}.{k}.y"],
                                     arrays.get(f"{i}.{k}.cache")))
            masks = [arrays[f"{i}.mask.{m}"] if present else None for m, present in enumerate(entry["masks"])]
            saved = _stack.StackSaved(layer._cell, layer.num_layers, 1, layer.state_size, windows, masks,
                                      windows[0].x, cell_size=layer.hidden_size)
            rows = entry.get("reset")
            rows = None if rows is None else np.array(rows, dtype=bool)
            self._history.append((saved, entry["steps"], rows))
        self._latest = 0
