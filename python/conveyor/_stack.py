"""Stacks and directions (docs/math.md, "Stacks and directions" and "Dropout"): ``num_layers`` layers, each
run forward in time and, when bidirectional, backward in time too, with dropout between layers.

Built on the one-window functions of ``_functional``: layer l > 0 reads the previous layer's output
sequence ``[T, B, D*H]`` (forward direction first); the reverse direction runs the time-reversed window and
stores its outputs at their original time index. States are ``[L*D, B, H]``, layer-major then direction,
and weights follow PyTorch's names (``weight_ih_l1_reverse``, ...), so a ``torch.nn.LSTM/GRU/RNN`` with the
same ``num_layers`` and ``bidirectional`` loads unchanged.

Dropout masks come from the counter-based generator of ``dropout_mask`` with ``mask_stream`` =
:func:`mask_stream` (layer, direction, kind): kind 0 is the dropout on a layer's output (``dropout=p``),
kind 1 the recurrent dropout inside the layer (``recurrent_dropout=q``). Variational masks are shared by every
step of the window. The arrays of any library go through: NumPy, CuPy, PyTorch and JAX.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import numpy as np

from . import _arrays, _functional

__all__ = ["StackGrads", "StackPlan", "StackSaved", "mask_stream", "stack_backward", "stack_forward"]

OUTPUT_DROPOUT, RECURRENT_DROPOUT = 0, 1


def mask_stream(layer: int, direction: int, kind: int) -> int:
    """The generator stream of one mask: (layer, direction, kind) packed into one integer."""
    return (layer << 16) | (direction << 8) | kind


class _Ops:
    """The few array operations a stack needs, for NumPy-like libraries (NumPy, CuPy, JAX) and PyTorch:
    ``_Ops.of(array)``, one per array type."""

    _by_type: dict = {}

    @classmethod
    def of(cls, like) -> _Ops:
        ops = cls._by_type.get(type(like))
        if ops is None:
            ops = cls._by_type[type(like)] = cls(like)
        return ops

    def __init__(self, like):
        library = _arrays.library_of(like) if _arrays.is_foreign(like) else "numpy"
        self.torch = library == "torch"
        if self.torch:
            import torch as xp
        elif library == "cupy":
            import cupy as xp
        elif library in ("jax", "jaxlib"):
            import jax.numpy as xp
        else:
            xp = np
        self.xp = xp

    def flip_time(self, a, reversal=None):
        """``a`` [T, B, ...] reversed in time: whole, or with ``reversal`` (:meth:`reversal`) each row within
        its length, the steps past it left in place (or, packed, the rows of a [tokens, ...] array)."""
        if reversal is not None:
            return self.contiguous(a[reversal])
        return a.flip(0) if self.torch else self.xp.ascontiguousarray(self.xp.flip(a, 0))

    def reversal(self, lengths, steps, like, packed=False):
        """The index arrays that reverse each row b of a [T, B, ...] array within its first lengths[b] steps
        (step t < lengths[b] from lengths[b] - 1 - t; the others stay): its own inverse. From host lengths.
        Packed (lengths non-increasing, a [tokens, ...] array whose step t holds the rows longer than t): the
        one index of the rows."""
        if packed:
            offsets = np.concatenate([[0], np.cumsum((lengths[None, :] > np.arange(steps)[:, None]).sum(1))])
            t = np.repeat(np.arange(steps), np.diff(offsets))
            k = np.arange(offsets[-1]) - offsets[t]
            index = (offsets[lengths[k] - 1 - t] + k,)
        else:
            t = np.arange(steps)[:, None]
            source = np.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)
            index = (source, np.broadcast_to(np.arange(len(lengths))[None, :], source.shape))
        if self.torch:
            return tuple(self.xp.as_tensor(i, device=like.device) for i in index)
        return tuple(self.xp.asarray(i) for i in index)

    def concat(self, parts):
        if len(parts) == 1:
            return parts[0]
        return self.xp.cat(parts, dim=-1) if self.torch else self.xp.concatenate(parts, axis=-1)

    def part(self, a, index, size):
        """a[..., index*size : (index+1)*size], contiguous."""
        if a.shape[-1] == size:
            return a
        piece = a[..., index * size:(index + 1) * size]
        return piece.contiguous() if self.torch else self.xp.ascontiguousarray(piece)

    def stack(self, parts):
        if len(parts) == 1:  # one layer and direction: a view, not a copy (np.stack costs microseconds)
            return parts[0][None]
        return self.xp.stack(parts)

    def concat_time(self, parts):
        return self.xp.cat(parts, dim=0) if self.torch else self.xp.concatenate(parts, axis=0)

    def zeros(self, shape, like):
        if self.torch:
            return self.xp.zeros(shape, dtype=like.dtype, device=like.device)
        return self.xp.zeros(shape, dtype=like.dtype)

    def contiguous(self, a):
        return a.contiguous() if self.torch else self.xp.ascontiguousarray(a)

    def index(self, host, like):
        """The NumPy integer array `host` as an index of this library (on `like`'s device)."""
        return self.xp.as_tensor(host, device=like.device) if self.torch else self.xp.asarray(host)

    def asarray(self, host, like):
        """The NumPy array `host` in this library, with `like`'s dtype (and device)."""
        if self.torch:
            return self.xp.as_tensor(host, dtype=like.dtype, device=like.device)
        return self.xp.asarray(host, dtype=like.dtype)


class StackSaved:
    """What :func:`stack_forward` keeps for :func:`stack_backward`: one window's ``Saved`` per layer and
    direction, and the output dropout masks."""

    __slots__ = ("cell", "num_layers", "directions", "hidden_size", "saved", "masks", "x", "reversal",
                 "batch", "cell_size")

    def __init__(self, cell, num_layers, directions, hidden_size, saved, masks, x, reversal=None, batch=None,
                 cell_size=None):
        self.cell, self.num_layers, self.directions = cell, num_layers, directions
        self.hidden_size, self.saved, self.masks, self.x = hidden_size, saved, masks, x
        self.reversal = reversal
        self.batch = batch  # packed windows: B (x is [tokens, input_size]); else None
        # The LSTM's cell-state units: hidden_size, but with a projection the h states have proj_size units
        # (hidden_size above) and c keeps these.
        self.cell_size = hidden_size if cell_size is None else cell_size


class StackGrads(NamedTuple):
    """Gradients of a stack: ``dx`` ``[T, B, input_size]``, ``dh0`` (and ``dc0`` for the LSTM, else None)
    ``[L*D, B, H]``, and ``weights``: one gradient tuple per layer and direction (layer-major), each with
    ``dW, dR, dbW, dbR`` (and ``dP``, ``dW_hr`` for the LSTM)."""

    dx: object
    dh0: object
    dc0: object
    weights: list


def _check_int(name, value, low):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {value!r} of type {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
    return int(value)


def _is_contiguous(a) -> bool:
    if hasattr(a, "is_contiguous"):  # torch
        return bool(a.is_contiguous())
    flags = getattr(a, "flags", None)  # NumPy, CuPy
    return True if flags is None else bool(flags.c_contiguous)


def _check_array(name, a, shape, meaning, like, *, cell_state=False):
    """An array argument of the stack: its type, shape, dtype and layout, checked before any window runs, so
    that a bad one is blamed by its own name and a rejected backward leaves the forward pass usable. The
    LSTM's cell-state arrays (``cell_state``: c0, dc_n) have the cell state's dtype, float32 beside 16-bit
    x."""
    if a is None:
        return
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name}: expected an array of shape {meaning}, got {type(a).__name__}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} = {meaning}, got {tuple(a.shape)}")
    if like is not None and hasattr(like, "dtype"):
        expected = _arrays.dtype_name(like.dtype)
        why = "the dtype of x"
        if cell_state and _arrays.cell_state_dtype_name(like.dtype) != expected:
            expected, why = _arrays.cell_state_dtype_name(like.dtype), f"the cell state's, for {expected} x"
        if _arrays.dtype_name(a.dtype) != expected:
            raise TypeError(f"{name}: expected dtype {expected} ({why}), got {_arrays.dtype_name(a.dtype)}")
    if not _is_contiguous(a):
        raise ValueError(f"{name}: expected a C-contiguous array of shape {tuple(a.shape)}")


def _host_lengths(lengths):
    """Lengths as a host NumPy int64 array (a GPU's copied), for the stack's own indexing."""
    if _arrays.is_foreign(lengths):
        library = _arrays.library_of(lengths)
        if library == "torch":
            lengths = lengths.detach().cpu()
        elif library == "cupy":
            lengths = lengths.get()
        elif hasattr(lengths, "numpy"):
            lengths = lengths.numpy()
    return _arrays.lengths_argument(np.asarray(lengths))


def window_extras(cell, rest) -> dict:
    """A window's weights beyond (W, R, bW, bR), as keyword arguments of its forward: the LSTM's P, W_hr and
    layer-norm gains (gamma_x, gamma_h, gamma_c, beta_c), the GRU's gains (gamma_x, gamma_h); absent entries
    (None, or past the tuple's end) are no such option."""
    rest = list(rest)
    if cell == "lstm":
        rest += [None] * (6 - len(rest))
        gains = tuple(rest[2:6])
        return {"P": rest[0], "W_hr": rest[1], "layer_norm": None if gains[0] is None else gains}
    if cell == "gru" and rest and rest[0] is not None:
        return {"layer_norm": tuple(rest[:2])}
    return {}


def _state_sizes(cell, weights) -> tuple[int, int]:
    """The units of the h states (R's columns: proj_size with a projection) and of the LSTM's c states (W_hr's
    columns with a projection, else the same)."""
    hidden = weights[0][1].shape[-1]
    W_hr = weights[0][5] if cell == "lstm" and len(weights[0]) > 5 else None
    return hidden, hidden if W_hr is None else W_hr.shape[-1]


# The keyword-only parameters of the one-window forwards that a stack's **options may not carry: the stack
# sets them itself, per window or per call (the option weights come from each window's weight tuple).
_SET_BY_THE_STACK = frozenset({"P", "W_hr", "layer_norm", "recurrent_dropout", "variational", "seed",
                               "mask_stream", "training", "lengths", "stream", "_packed"})


def _cell_options(cell) -> frozenset:
    """The options a stack of ``cell`` passes on to each window: its forward's keyword-only parameters."""
    parameters = inspect.signature(getattr(_functional, f"{cell}_forward")).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is p.KEYWORD_ONLY) - _SET_BY_THE_STACK


_CELL_OPTIONS = {cell: _cell_options(cell) for cell in ("lstm", "gru", "rnn")}


class StackPlan:
    """A stack's configuration checked and each window's core options built, once: what
    :func:`stack_forward` does before it runs a window, kept by callers that run the same layers with the same
    weights call after call (the drop-in caches one per configuration, so that a small call costs little more
    than its kernels). Arguments as :func:`stack_forward`'s; :meth:`run` takes the per-call ones. The weights
    are held by reference: changes made to them in place show in the next call."""

    __slots__ = ("cell", "num_layers", "directions", "dropout", "variational", "training", "windows",
                 "hidden", "cell_size", "stream", "host_weights")

    def __init__(self, cell, weights, *, num_layers=1, bidirectional=False, dropout=0.0, variational=False,
                 recurrent_dropout=0.0, training=True, stream=None, **options):
        if cell not in ("lstm", "gru", "rnn"):
            raise ValueError(f"cell: expected 'lstm', 'gru' or 'rnn', got {cell!r}")
        unknown = sorted(set(options) - _CELL_OPTIONS[cell])
        if unknown:
            raise TypeError(f"{unknown[0]}: not an option of a stack of {cell} layers (expected one of "
                            f"{', '.join(sorted(n for n in _CELL_OPTIONS[cell] if not n.startswith('_')))})")
        self.cell = cell
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.directions = 2 if _functional._check_flag("bidirectional", bidirectional) else 1
        self.dropout = _functional.check_probability("dropout", dropout)
        self.variational = _functional._check_flag("variational", variational)
        self.training = _functional._check_flag("training", training)
        self.stream = stream
        weights = list(weights)
        if len(weights) != self.num_layers * self.directions:
            raise ValueError(f"weights: expected {self.num_layers * self.directions} entries (num_layers * "
                             f"directions), got {len(weights)}")
        if any(not isinstance(w, (tuple, list)) or len(w) < 4 for w in weights):
            raise TypeError("weights: expected tuples (W, R, bW, bR, ...) for each layer and direction")
        self.hidden, self.cell_size = _state_sizes(cell, weights)
        self.windows = []  # per window: (its core options, W, R, bW, bR, P, W_hr, layer-norm gains)
        for k, (W, R, bW, bR, *rest) in enumerate(weights):
            extra = window_extras(cell, rest)
            P, W_hr = extra.get("P"), extra.get("W_hr")
            gains = _functional._layer_norm_gains(cell, extra.get("layer_norm"))
            window_options, _ = _functional.window_options(
                cell, training=self.training, recurrent_dropout=recurrent_dropout,
                variational=self.variational,
                mask_stream=mask_stream(k // self.directions, k % self.directions, RECURRENT_DROPOUT),
                peephole=P is not None, layer_norm=gains is not None, **options)
            self.windows.append((window_options, W, R, bW, bR, P, W_hr, gains))
        # Whether every weight is a NumPy array: then a call on NumPy arrays, without lengths or a stream,
        # goes to the core directly (_functional._forward's `host`).
        arrays = [a for _, *weights, gains in self.windows for a in (*weights, *(gains or ()))]
        self.host_weights = self.stream is None and all(a is None or type(a) is np.ndarray for a in arrays)

    def window(self, k, seed):
        """Window k's core options for a call with this seed, and its weights ``(W, R, bW, bR, P, W_hr,
        gains)``."""
        options, *weights = self.windows[k]
        if seed and "dropout_seed" in options:
            options = {**options, "dropout_seed": seed}
        return options, weights

    def run(self, x, h0=None, c0=None, *, seed=0, lengths=None, _packed=False):
        """One call of :func:`stack_forward` with this configuration: ``(y, h_n, c_n or None, saved)``."""
        cell, num_layers, directions = self.cell, self.num_layers, self.directions
        seed = _functional.check_seed("seed", seed)
        hidden, cell_size, training = self.hidden, self.cell_size, self.training
        if cell != "lstm" and c0 is not None:
            raise ValueError(f"c0: only an LSTM has a cell state, but the cell is {cell}")
        ops = _Ops.of(x)
        if not hasattr(x, "shape") or len(x.shape) != (2 if _packed else 3):
            # The first window's checks name x exactly; the states' shapes need B first.
            getattr(_functional, f"{cell}_forward")(x, *self.windows[0][1:5], training=False, lengths=lengths,
                                                    _packed=_packed)
        host = (self.host_weights and lengths is None and type(x) is np.ndarray
                and (h0 is None or type(h0) is np.ndarray) and (c0 is None or type(c0) is np.ndarray))
        if lengths is not None:
            lengths = _host_lengths(lengths)  # read once here, for the reversals and every window
        if _packed:
            steps, batch = int(lengths[0]), len(lengths)  # the core has checked them in the first window
        else:
            steps, batch = x.shape[0], x.shape[1]
        if h0 is not None:
            h_meaning = "(num_layers * directions, B, proj_size)" if cell_size != hidden else \
                "(num_layers * directions, B, hidden_size)"
            _check_array("h0", h0, (num_layers * directions, batch, hidden), h_meaning, x)
        _check_array("c0", c0, (num_layers * directions, batch, cell_size),
                     "(num_layers * directions, B, hidden_size)", x, cell_state=True)
        reversal, positions = None, None
        if lengths is not None:
            if (directions == 2 and lengths.dtype.kind == "i" and lengths.shape == (batch,)
                    and 1 <= lengths.min() and lengths.max() <= steps):
                reversal = ops.reversal(lengths, steps, x, packed=_packed)
            if _packed:  # where each packed row lies in a padded [T*B] array: the rows of the output masks
                present = lengths[None, :] > np.arange(steps)[:, None]
                positions = ops.index(present.reshape(-1).nonzero()[0], like=x)
        saved, masks, h_n, c_n = [], [], [], []
        layer_input = x
        for layer in range(num_layers):
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                options, (W, R, bW, bR, P, W_hr, gains) = self.window(k, seed)
                inp = layer_input if direction == 0 else ops.flip_time(layer_input, reversal)
                y, h_T, c_T, window = _functional._forward(
                    cell, options, inp, W, R, bW, bR, None if h0 is None else h0[k],
                    None if c0 is None else c0[k], P, W_hr, lengths, training, self.stream, _packed, gains,
                    host)
                outputs.append(y if direction == 0 else ops.flip_time(y, reversal))
                h_n.append(h_T)
                if cell == "lstm":
                    c_n.append(c_T)
                saved.append(window)
            y = ops.concat(outputs)
            if layer < num_layers - 1 and self.dropout > 0 and training:
                mask = ops.concat([
                    _functional.dropout_mask(y, (steps, batch, hidden), self.dropout,
                                             variational=self.variational, seed=seed,
                                             mask_stream=mask_stream(layer, d, OUTPUT_DROPOUT))
                    for d in range(directions)])
                if positions is not None:
                    mask = ops.contiguous(mask.reshape(steps * batch, -1)[positions])
                masks.append(mask)
                y = y * mask
            else:
                masks.append(None)
            layer_input = y
        state = None
        if training:
            state = StackSaved(cell, num_layers, directions, hidden, saved, masks, x, reversal,
                               batch if _packed else None, cell_size)
        return layer_input, ops.stack(h_n), ops.stack(c_n) if cell == "lstm" else None, state


def stack_forward(cell, x, weights, h0=None, c0=None, *, num_layers=1, bidirectional=False, dropout=0.0,
                  variational=False, recurrent_dropout=0.0, seed=0, training=True, lengths=None,
                  _packed=False, **options):
    """Runs ``num_layers`` layers of ``cell`` (``"lstm"``, ``"gru"`` or ``"rnn"``) over the window ``x``.

    ``weights``: a sequence of L*D tuples ``(W, R, bW, bR)``, layer-major then direction, with the options'
    weights after them: the LSTM's ``P``, ``W_hr``, ``gamma_x``, ``gamma_h``, ``gamma_c``, ``beta_c`` (None,
    or left off the end, where the option is off), the GRU's ``gamma_x``, ``gamma_h`` (window_extras).
    ``h0``/``c0``: ``[L*D, B, H]`` or None (c0, and the returned c_n, of the cell state's dtype: float32
    beside float16 or bfloat16 x; with a projection h0, h_n and y have proj_size units where H is written, c0
    and c_n hidden_size). ``dropout``: inverted dropout on each layer's output but the last; ``variational``:
    its masks (and those of ``recurrent_dropout``) shared by every step; both apply in training only.
    ``options``: the cell's own options (activation, reset_after, coupled_gates, forget_bias, cell_clip,
    weight_dropout, zoneout, zoneout_cell, allow_tf32, stream).
    ``lengths``: None, or ``[B]`` (docs/math.md, "Variable lengths"): row b runs its first lengths[b] steps in
    every layer, the reverse direction from step lengths[b] - 1 down to 0 (its input reversed within the
    row's length, so each row's masks count its own steps), and y is 0 past them. (``_packed``, the drop-in's:
    x and y are a PackedSequence's data ``[tokens, features]``, lengths non-increasing; ForwardArgs::packed.)
    Returns ``(y [T, B, D*H], h_n [L*D, B, H], c_n or None, saved)``.
    """
    plan = StackPlan(cell, weights, num_layers=num_layers, bidirectional=bidirectional, dropout=dropout,
                     variational=variational, recurrent_dropout=recurrent_dropout, training=training,
                     **options)
    return plan.run(x, h0, c0, seed=seed, lengths=lengths, _packed=_packed)


def stack_backward(saved, dy, dh_n=None, dc_n=None, *, stream=None, _keep=False) -> StackGrads:
    """Exact gradients of a stack from :func:`stack_forward`'s ``saved`` (serves one call), given ``dy``
    ``[T, B, D*H]`` and optionally ``dh_n``/``dc_n`` ``[L*D, B, H]`` (dc_n, and the returned dc0, of the cell
    state's dtype, as c0). (``_keep``: the TBPTT driver's, for
    windows that later spans reach back over again.)"""
    if not isinstance(saved, StackSaved):
        raise TypeError(f"saved: expected the StackSaved that stack_forward returned with training=True, "
                        f"got {type(saved).__name__}")
    if saved.saved is None:
        raise ValueError("saved: already used by a backward call, which released it; run forward again")
    cell, L, D, H = saved.cell, saved.num_layers, saved.directions, saved.hidden_size
    if saved.batch is not None:  # packed
        B, dy_shape, meaning = saved.batch, (saved.x.shape[0], D * H), "(tokens, directions * hidden_size)"
    else:
        B = saved.x.shape[1]
        dy_shape, meaning = (saved.x.shape[0], B, D * H), "(T, B, directions * hidden_size)"
    _check_array("dy", dy, dy_shape, meaning, saved.x)
    if dy is None:
        raise TypeError(f"dy: expected an array of shape {meaning}, got NoneType")
    _check_array("dh_n", dh_n, (L * D, B, H), "(num_layers * directions, B, hidden_size)"
                 if saved.cell_size == H else "(num_layers * directions, B, proj_size)", saved.x)
    _check_array("dc_n", dc_n, (L * D, B, saved.cell_size), "(num_layers * directions, B, hidden_size)",
                 saved.x, cell_state=True)
    if cell != "lstm" and dc_n is not None:
        raise ValueError(f"dc_n: only an LSTM has a cell state, but the cell is {cell}")
    backward = getattr(_functional, f"{cell}_backward")
    ops = _Ops.of(dy)
    grads = [None] * (L * D)
    dh0, dc0 = [None] * (L * D), [None] * (L * D)
    d_output = dy
    for layer in reversed(range(L)):
        if saved.masks[layer] is not None:
            d_output = d_output * saved.masks[layer]
        d_input = None
        for direction in range(D):
            k = layer * D + direction
            d = ops.part(d_output, direction, H)
            if direction == 1:
                d = ops.flip_time(d, saved.reversal)
            finals = (None if dh_n is None else dh_n[k],)
            if cell == "lstm":
                finals += (None if dc_n is None else dc_n[k],)
            g = backward(saved.saved[k], d, *finals, stream=stream, _keep=_keep)
            dx = g.dx if direction == 0 else ops.flip_time(g.dx, saved.reversal)
            d_input = dx if d_input is None else d_input + dx
            dh0[k] = g.dh0
            if cell == "lstm":
                dc0[k] = g.dc0
            grads[k] = g
        d_output = d_input
    if not _keep:
        saved.saved = None
    return StackGrads(d_output, ops.stack(dh0), ops.stack(dc0) if cell == "lstm" else None, grads)


def saved_arrays(saved: StackSaved) -> list:
    """What a StackSaved holds beyond the stack's inputs and its output y, as a flat list for the drop-in's
    custom operator (which must hand every saved tensor over as an output): per window (layer-major, then
    direction) its output as the window produced it (reversed in time for a reverse direction; None for a
    one-way stack's last layer, whose output is y) and its cache (None for the RNN); then per layer its output
    dropout mask (None where there is none). :func:`saved_from_arrays` rebuilds the StackSaved."""
    windows = []
    last = saved.num_layers - 1
    for k, window in enumerate(saved.saved):
        one_way_output = saved.directions == 1 and k // saved.directions == last
        windows += [None if one_way_output else window.y, window.cache]
    return windows + list(saved.masks)


def saved_from_arrays(cell, x, weights, h0, c0, y, arrays, *, num_layers=1, bidirectional=False, dropout=0.0,
                      variational=False, recurrent_dropout=0.0, seed=0, lengths=None, _packed=False,
                      stream=None, **options) -> StackSaved:
    """The StackSaved of a training forward of :func:`stack_forward` with these arguments, from its inputs,
    its output y and :func:`saved_arrays`: each window's input is computed again from the layer below's
    outputs and mask (as the forward formed it), nothing else."""
    plan = StackPlan(cell, weights, num_layers=num_layers, bidirectional=bidirectional, dropout=dropout,
                     variational=variational, recurrent_dropout=recurrent_dropout, training=True,
                     stream=stream, **options)
    ops = _Ops.of(x)
    directions, hidden, cell_size = plan.directions, plan.hidden, plan.cell_size
    reversal = batch = None
    if lengths is not None:
        lengths = _host_lengths(lengths)
        steps, batch = (int(lengths[0]), len(lengths)) if _packed else (x.shape[0], x.shape[1])
        if bidirectional:
            reversal = ops.reversal(lengths, steps, x, packed=_packed)
    masks = arrays[2 * num_layers * directions:]
    saved, layer_input = [], x
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            window_options, (W, R, bW, bR, P, W_hr, gains) = plan.window(k, seed)
            window_y, cache = arrays[2 * k], arrays[2 * k + 1]
            window_y = y if window_y is None else window_y
            inp = layer_input if direction == 0 else ops.flip_time(layer_input, reversal)
            saved.append(_functional.Saved(cell, window_options, inp, W, R, bW, bR,
                                           None if h0 is None else h0[k], None if c0 is None else c0[k], P,
                                           W_hr, gains, window_y, cache, lengths, _packed))
            outputs.append(window_y if direction == 0 else ops.flip_time(window_y, reversal))
        layer_input = ops.concat(outputs)
        if masks[layer] is not None:
            layer_input = layer_input * masks[layer]
    return StackSaved(cell, num_layers, directions, hidden, saved, masks, x, reversal,
                      batch if _packed else None, cell_size)
