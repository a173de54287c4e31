"""The functional API: forward and backward over a window for each cell, on NumPy arrays.

Shapes (time-major) and weight layout follow PyTorch (docs/math.md): ``x`` is ``[T, B, input_size]``, ``W`` is
``[G*hidden_size, input_size]``, ``R`` is ``[G*hidden_size, hidden_size]``, ``bW`` and ``bR`` are
``[G*hidden_size]`` with G = 4 (LSTM: i, f, g, o), 3 (GRU: r, z, n) or 1 (RNN). Every array of one call has
the same dtype and device and is C-contiguous, but for the LSTM's cell-state arrays (``c0``, ``c_T``,
``dc_T``, ``dc0``), which are float32 when x is float16 or bfloat16 (the cell state is kept in float32, so
windows chained through ``(h_T, c_T)`` give exactly the outputs of one call); anything else raises
ValueError or TypeError naming the argument. The math runs in the compiled core with the GIL released.

Arrays may be NumPy arrays (CPU; float32 or float64) or the arrays of any library that exports DLPack: CuPy,
PyTorch and JAX, on the CPU (float32, float64) or a CUDA GPU (float32, float64, float16, bfloat16). They
are read and written in place, without copies, and the outputs are arrays of x's library on x's device. GPU
work runs on ``stream`` when given (an int ``cudaStream_t``, or a CuPy or PyTorch stream), else on the
current stream of x's library. ``allow_tf32=True`` lets float32 work on a GPU multiply its time-parallel
products, and the persistent kernels' recurrent products, on tensor cores in TF32.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from . import _arrays, _conveyor

__all__ = [
    "GRUGrads",
    "LSTMGrads",
    "RNNGrads",
    "Saved",
    "clip_grad_norm",
    "dropout_mask",
    "gru_backward",
    "gru_forward",
    "lstm_backward",
    "lstm_forward",
    "rnn_backward",
    "rnn_forward",
]

_ACTIVATIONS = ("tanh", "relu")


class LSTMGrads(NamedTuple):
    """Gradients of an LSTM window. ``dbW``/``dbR`` are None when forward ran without that bias, ``dP`` (the
    peephole weights' gradient, ``[3, hidden_size]``) when it ran without peepholes, ``dW_hr`` (the
    projection's, ``[proj_size, hidden_size]``) when it ran without a projection, ``dlayer_norm`` (the gains'
    gradients, as ``layer_norm`` gave them) without layer normalisation."""

    dx: np.ndarray
    dh0: np.ndarray
    dc0: np.ndarray
    dW: np.ndarray
    dR: np.ndarray
    dbW: np.ndarray | None
    dbR: np.ndarray | None
    dP: np.ndarray | None = None
    dW_hr: np.ndarray | None = None
    dlayer_norm: tuple | None = None


class GRUGrads(NamedTuple):
    """Gradients of a GRU window. ``dbW``/``dbR`` are None when forward ran without that bias,
    ``dlayer_norm`` (the gains' gradients, as ``layer_norm`` gave them) without layer normalisation."""

    dx: np.ndarray
    dh0: np.ndarray
    dW: np.ndarray
    dR: np.ndarray
    dbW: np.ndarray | None
    dbR: np.ndarray | None
    dlayer_norm: tuple | None = None


class RNNGrads(NamedTuple):
    """Gradients of an RNN window. ``dbW``/``dbR`` are None when forward ran without that bias."""

    dx: np.ndarray
    dh0: np.ndarray
    dW: np.ndarray
    dR: np.ndarray
    dbW: np.ndarray | None
    dbR: np.ndarray | None


class Saved:
    """What a forward pass keeps for its backward pass: references to its inputs and outputs and the cache
    of gate values. Used by exactly one backward call, which releases it; the arrays it refers to must not
    be modified in between."""

    __slots__ = ("cell", "options", "x", "W", "R", "has_bW", "has_bR", "h0", "c0", "P", "W_hr", "layer_norm",
                 "y", "cache", "lengths", "packed")

    def __init__(self, cell, options, x, W, R, bW, bR, h0, c0, P, W_hr, layer_norm, y, cache, lengths=None,
                 packed=False):
        self.cell = cell
        self.options = options
        self.x, self.W, self.R = x, W, R
        self.has_bW, self.has_bR = bW is not None, bR is not None
        self.h0, self.c0, self.P, self.W_hr, self.y, self.cache = h0, c0, P, W_hr, y, cache
        self.layer_norm = layer_norm
        self.lengths, self.packed = lengths, packed

    @property
    def consumed(self) -> bool:
        return self.x is None

    def __repr__(self) -> str:
        state = "consumed" if self.consumed else f"x{tuple(self.x.shape)}"
        return f"Saved({self.cell}, {state})"


def _check_choice(name: str, value, choices) -> str:
    """One of the strings ``choices``, or a TypeError / ValueError naming ``name`` and the choices."""
    expected = (" or ".join(map(repr, choices)) if len(choices) == 2
                else f"one of {', '.join(map(repr, choices))}")
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected {expected}, got {value!r} of type {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def _check_activation(activation) -> str:
    return _check_choice("activation", activation, _ACTIVATIONS)


# The checks below take the common case (a Python float, int or bool in range) first: the abstract-class
# checks of numbers.Real and numbers.Integral cost about a microsecond each, and a window checks a dozen
# options.


def _check_flag(name: str, value) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r} of type {type(value).__name__}")
    return bool(value)


def _check_number(name: str, value, *, positive=False) -> float:
    if type(value) is float and math.isfinite(value) and (value > 0 or not positive):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name}: expected a finite number{' > 0' if positive else ''}, got {value!r}")
    return value


def check_probability(name: str, value) -> float:
    """A dropout probability: a number in [0, 1)."""
    if type(value) is float and 0.0 <= value < 1.0:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a probability in [0, 1), got {value!r} of type "
                        f"{type(value).__name__}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return value


def check_seed(name: str, value) -> int:
    """A seed or mask stream: an integer in [0, 2**64)."""
    if type(value) is int and 0 <= value < 2**64:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer in [0, 2**64), got {value!r} of type "
                        f"{type(value).__name__}")
    if not 0 <= value < 2**64:
        raise ValueError(f"{name}: expected an integer in [0, 2**64), got {value}")
    return int(value)


ALGORITHMS = ("auto", "per_step", "persistent")


def check_algorithm(algorithm) -> str:
    return _check_choice("algorithm", algorithm, ALGORITHMS)


# The streams of a window's masks beyond its recurrent dropout's (`mask_stream`): mask_stream + these. The
# stacks give each layer and direction mask_stream(layer, direction, 1), so that these are its kinds 2, 3, 4.
WEIGHT_DROPOUT_OFFSET, ZONEOUT_OFFSET, ZONEOUT_CELL_OFFSET = 1, 2, 3


def _options(activation, training, allow_tf32, dropout=(0.0, True, 0, 0), algorithm="auto", regularisers=None,
             **flags) -> tuple[dict, bool]:
    """The cell options as the compiled core takes them, checked; and `training`. `dropout` is
    (recurrent_dropout, variational, seed, mask_stream), applied in training only. `regularisers`:
    (weight_dropout, zoneout, zoneout_cell): DropConnect in training only; zoneout sampled in training, its
    expectation in evaluation."""
    options = {"activation": _check_activation(activation),
               "allow_tf32": _check_flag("allow_tf32", allow_tf32),
               "algorithm": check_algorithm(algorithm)}
    for name, value in flags.items():
        options[name] = _check_flag(name, value)
    training = _check_flag("training", training)
    q, variational, seed, mask_stream = dropout
    q = check_probability("recurrent_dropout", q)
    variational = _check_flag("variational", variational)
    seed, mask_stream = check_seed("seed", seed), check_seed("mask_stream", mask_stream)
    if training and q > 0:
        options.update(recurrent_dropout=q, variational=variational, dropout_seed=seed,
                       dropout_stream=mask_stream)
    weight_dropout, zoneout, zoneout_cell = regularisers or (0.0, 0.0, 0.0)
    weight_dropout = check_probability("weight_dropout", weight_dropout)
    zoneout = check_probability("zoneout", zoneout)
    zoneout_cell = check_probability("zoneout_cell", zoneout_cell)
    if training and weight_dropout > 0:
        options.update(weight_dropout=weight_dropout, dropout_seed=seed,
                       weight_dropout_stream=(mask_stream + WEIGHT_DROPOUT_OFFSET) % 2**64)
    if zoneout > 0 or zoneout_cell > 0:
        options.update(zoneout_sample=training, dropout_seed=seed)
    if zoneout > 0:
        options.update(zoneout=zoneout, zoneout_stream=(mask_stream + ZONEOUT_OFFSET) % 2**64)
    if zoneout_cell > 0:
        options.update(zoneout_cell=zoneout_cell,
                       zoneout_cell_stream=(mask_stream + ZONEOUT_CELL_OFFSET) % 2**64)
    return options, training


def window_options(cell, *, activation="tanh", training=True, allow_tf32=False, recurrent_dropout=0.0,
                   variational=True, seed=0, mask_stream=0, algorithm="auto", coupled_gates=False,
                   peephole=False, forget_bias=0.0, cell_clip=None, reset_after=True, weight_dropout=0.0,
                   zoneout=0.0, zoneout_cell=0.0, layer_norm=False,
                   _zoneout_sample=None) -> tuple[dict, bool]:
    """The core's options of one window of ``cell`` as its forward function builds them from its keyword
    arguments (checked), and ``training``: what a backward needs to run the window's backward again.
    (``_zoneout_sample``, the drop-in's: whether zoneout samples its masks, when that differs from
    ``training``, which there means saving for a backward, in evaluation mode too.)"""
    dropout = (recurrent_dropout, variational, seed, mask_stream)
    if cell == "rnn" and zoneout:
        raise ValueError(f"zoneout: an option of the LSTM and the GRU, got {zoneout!r} for an rnn")
    if cell != "lstm" and zoneout_cell:
        raise ValueError(f"zoneout_cell: an LSTM option, got {zoneout_cell!r} for a {cell}")
    regularisers = (weight_dropout, zoneout, zoneout_cell)
    if cell == "lstm":
        options, training = _options(activation, training, allow_tf32, dropout, algorithm, regularisers,
                                     coupled_gates=coupled_gates, peephole=peephole)
        options["forget_bias"] = _check_number("forget_bias", forget_bias)
        options["cell_clip"] = 0.0 if cell_clip is None else _check_number("cell_clip", cell_clip,
                                                                           positive=True)
    elif cell == "gru":
        options, training = _options(activation, training, allow_tf32, dropout, algorithm, regularisers,
                                     reset_after=reset_after)
    else:
        options, training = _options(activation, training, allow_tf32, dropout, algorithm, regularisers)
    if layer_norm:
        options["layer_norm"] = True
    if _zoneout_sample is not None and "zoneout_sample" in options:
        options["zoneout_sample"] = bool(_zoneout_sample)
    return options, training


def _layer_norm_gains(cell, layer_norm):
    """The gains as a tuple, checked for their count (their shapes are the core's to check), or None."""
    if layer_norm is None:
        return None
    count = 4 if cell == "lstm" else 2
    names = "(gamma_x, gamma_h, gamma_c, beta_c)" if cell == "lstm" else "(gamma_x, gamma_h)"
    if not isinstance(layer_norm, (tuple, list)) or len(layer_norm) != count:
        raise TypeError(f"layer_norm: expected None or a tuple {names}, got {layer_norm!r:.80}")
    return tuple(layer_norm)


def _forward(cell, options, x, W, R, bW, bR, h0, c0, P, W_hr, lengths, training, stream, packed=False,
             layer_norm=None, host=False):
    """One window through the core. ``packed`` (the stacks' and the drop-in's): x and y are a
    PackedSequence's data, ``[tokens, features]``, with ``lengths`` non-increasing on the host (C++ API,
    ForwardArgs::packed). ``host``: the caller has made sure that every array is a NumPy array, that there
    are no lengths and no stream (a StackPlan's small calls, where those checks are a tenth of the time)."""
    inputs = (x, W, R, bW, bR, h0, c0, P, W_hr)
    if host:
        y, h_T, c_T, cache = _conveyor.forward(cell, options, *inputs, layer_norm, None, packed, training)
        saved = Saved(cell, options, *inputs, layer_norm, y, cache, None, packed) if training else None
        return y, h_T, c_T, saved
    lengths = _arrays.lengths_argument(lengths)
    if _arrays.any_foreign(*inputs, *(layer_norm or ()), lengths):
        inputs = tuple(None if a is None else _arrays.for_export(a) for a in inputs)
        if layer_norm is not None:
            layer_norm = tuple(_arrays.for_export(a) for a in layer_norm)
        allocate = _arrays.Allocator(inputs[0])
        outputs = _conveyor.forward_dlpack(cell, options, *inputs, layer_norm, lengths, packed, training,
                                           allocate, _arrays.stream_of(inputs[0], stream))
        y, h_T, c_T, cache = allocate.finish(outputs)
    else:
        _arrays.stream_of(x, stream)  # checks the argument; NumPy work runs on the CPU
        y, h_T, c_T, cache = _conveyor.forward(cell, options, *inputs, layer_norm, lengths, packed, training)
    saved = Saved(cell, options, *inputs, layer_norm, y, cache, lengths, packed) if training else None
    return y, h_T, c_T, saved


def _backward(cell: str, saved, dy, dh_T, dc_T, stream, keep=False):
    if not isinstance(saved, Saved):
        raise TypeError(f"saved: expected the Saved object that {cell}_forward returned with training=True, "
                        f"got {type(saved).__name__}")
    if saved.cell != cell:
        raise ValueError(f"saved: expected the result of {cell}_forward, got that of {saved.cell}_forward")
    if saved.consumed:
        raise ValueError("saved: already used by a backward call, which released it; run forward again")
    before = (saved.x, saved.W, saved.R, saved.h0, saved.c0, saved.P, saved.W_hr)
    after = (saved.y, saved.cache, dy, dh_T, dc_T)
    layer_norm = saved.layer_norm
    if _arrays.any_foreign(*before, *after, *(layer_norm or ()), saved.lengths):
        before = tuple(None if a is None else _arrays.for_export(a) for a in before)
        after = tuple(None if a is None else _arrays.for_export(a) for a in after)
        if layer_norm is not None:
            layer_norm = tuple(_arrays.for_export(a) for a in layer_norm)
        allocate = _arrays.Allocator(saved.x)
        grads = _conveyor.backward_dlpack(cell, saved.options, *before, layer_norm, *after, saved.lengths,
                                          saved.packed, saved.has_bW, saved.has_bR, allocate,
                                          _arrays.stream_of(saved.x, stream))
        grads = allocate.finish(grads)
    else:
        _arrays.stream_of(saved.x, stream)
        grads = _conveyor.backward(cell, saved.options, *before, layer_norm, *after, saved.lengths,
                                   saved.packed, saved.has_bW, saved.has_bR)
    if not keep:  # the TBPTT driver keeps a window's Saved for the later spans that reach back over it
        saved.x = saved.W = saved.R = saved.h0 = saved.c0 = saved.P = saved.W_hr = None
        saved.y = saved.cache = saved.lengths = saved.layer_norm = None
    return grads


def lstm_forward(x, W, R, bW, bR, h0=None, c0=None, *, P=None, W_hr=None, coupled_gates=False,
                 forget_bias=0.0, cell_clip=None, activation="tanh", recurrent_dropout=0.0, variational=True,
                 seed=0, mask_stream=0, training=True, allow_tf32=False, algorithm="auto", lengths=None,
                 weight_dropout=0.0, zoneout=0.0, zoneout_cell=0.0, layer_norm=None, stream=None,
                 _packed=False, _zoneout_sample=None):
    """Runs an LSTM over the window ``x`` ``[T, B, input_size]``.

    ``bW``/``bR`` may be None (no bias); ``h0``/``c0`` ``[B, hidden_size]`` default to zeros. ``c0`` and the
    returned ``c_T`` have x's dtype, but float32 for float16 and bfloat16 x (the float32 cell state,
    unrounded, so that ``c_T`` chains the next window exactly). Options (docs/math.md):
    ``P`` ``[3, hidden_size]``, peephole weights p_i, p_f, p_o (Gers & Schmidhuber 2000; None: no peepholes);
    ``coupled_gates`` (CIFG, i = 1 - f; W, R and the biases then hold 3 gate blocks f, g, o); ``forget_bias``
    added to f's pre-activation; ``cell_clip`` (None, or c_t clamped to [-cell_clip, cell_clip]);
    ``activation`` (``"tanh"`` or ``"relu"``). Returns ``(y, h_T, c_T, saved)``: ``y`` is
    ``[T, B, hidden_size]``, ``saved`` feeds :func:`lstm_backward` (None when ``training=False``).

    ``W_hr`` ``[proj_size, hidden_size]``: a projection (LSTMP, Sak et al. 2014; PyTorch's ``proj_size`` and
    ``weight_hr_l{k}``; None: none). ``h_t = W_hr (o * act(c_t))``: ``R`` is then
    ``[G*hidden_size, proj_size]``, and ``h0``, ``y``, ``h_T`` and the recurrent dropout mask have proj_size
    units, while ``c0``/``c_T`` keep hidden_size.

    ``lengths`` (every forward): None, or ``[B]`` integers (a sequence, or an int32/int64 array of any library
    on the CPU or x's device; a GPU's is copied to the host, which waits for the stream) with
    ``1 <= lengths[b] <= T``, in any order, as PyTorch's
    ``PackedSequence`` carries them (docs/math.md, "Variable lengths"). Row b then runs steps
    ``0 .. lengths[b] - 1`` only: ``h_T``/``c_T`` hold its state after them, ``y`` is 0 at the steps after
    them (and so is the backward's ``dx``; ``dy`` there is ignored), and those steps cost nothing: the
    window's work is proportional to ``sum(lengths)``.

    Recurrent dropout (every cell, in training only): ``recurrent_dropout=q`` drops h_{t-1} where it enters
    the recurrent product, ``R (m * h_{t-1})``, with the mask ``dropout_mask(..., q, variational=variational,
    seed=seed, mask_stream=mask_stream)`` of shape ``[T, B, hidden_size]`` (one mask shared by every step when
    ``variational``, Gal & Ghahramani 2016).

    Regularisers (docs/math.md, "Regularisers"): ``weight_dropout=p`` (every cell, in training only):
    DropConnect on R, one mask for the window, ``dropout_mask(..., (1, G*hidden_size, R's columns), p,
    variational=True, seed=seed, mask_stream=mask_stream + 1)[0]``, as AWD-LSTM's weight drop.
    ``zoneout=z`` (LSTM and GRU) and ``zoneout_cell`` (LSTM): each unit of h (of c) keeps its previous value
    with probability z, per step, row and unit, drawn from the streams ``mask_stream + 2`` (``+ 3``) in
    training; in evaluation (``training=False``) the expectation ``z h_{t-1} + (1 - z) h~_t``.
    ``layer_norm=(gamma_x, gamma_h, gamma_c, beta_c)`` (LSTM; the GRU's ``(gamma_x, gamma_h)``): layer
    normalisation (Ba et al. 2016, as Haste's LayerNormLSTM), ``a = LN(W x_t; gamma_x) + bW + LN(R h_{t-1};
    gamma_h) + bR`` with gains ``[G*hidden_size]``, and the output ``o * act(LN(c_t; gamma_c, beta_c))`` with
    ``[hidden_size]`` each; the backward returns their gradients as ``dlayer_norm``.

    ``algorithm`` (every forward; the backward of a window takes the same): how the CUDA backend runs the
    recurrence. ``"persistent"``: one cooperative launch for the window, each block keeping its slice of R
    on chip; ``"per_step"``: one launch per step; ``"auto"``: persistent where it fits on the device and
    B <= 32 (where it measured faster), per_step elsewhere. A projection (``W_hr``) runs on the per-step
    kernels: ``"auto"`` takes them for it. Forcing ``"persistent"`` where it does not fit or with ``W_hr``
    raises ``ValueError`` saying why; arrays on the CPU take ``"auto"`` only. ``CONVEYOR_LOG_ALGORITHM=1``
    prints each CUDA window's choice.
    """
    options, training = window_options(
        "lstm", activation=activation, training=training, allow_tf32=allow_tf32,
        recurrent_dropout=recurrent_dropout, variational=variational, seed=seed, mask_stream=mask_stream,
        algorithm=algorithm, coupled_gates=coupled_gates, peephole=P is not None, forget_bias=forget_bias,
        cell_clip=cell_clip, weight_dropout=weight_dropout, zoneout=zoneout, zoneout_cell=zoneout_cell,
        layer_norm=layer_norm is not None, _zoneout_sample=_zoneout_sample)
    return _forward("lstm", options, x, W, R, bW, bR, h0, c0, P, W_hr, lengths, training, stream, _packed,
                    _layer_norm_gains("lstm", layer_norm))


def lstm_backward(saved, dy, dh_T=None, dc_T=None, *, stream=None, _keep=False) -> LSTMGrads:
    """Exact gradients of the window from :func:`lstm_forward`'s ``saved``, given ``dy``
    ``[T, B, hidden_size]`` and optionally ``dh_T``/``dc_T`` ``[B, hidden_size]`` (None: no loss on the
    final state). ``dc_T`` and the returned ``dc0`` have the dtype of ``c0``: float32 for float16 and bfloat16
    x."""
    return LSTMGrads(*_backward("lstm", saved, dy, dh_T, dc_T, stream, _keep))


def gru_forward(x, W, R, bW, bR, h0=None, *, reset_after=True, activation="tanh", recurrent_dropout=0.0,
                variational=True, seed=0, mask_stream=0, training=True, allow_tf32=False, algorithm="auto",
                lengths=None, weight_dropout=0.0, zoneout=0.0, layer_norm=None, stream=None, _packed=False,
                _zoneout_sample=None):
    """Runs a GRU over the window ``x``. ``reset_after=True`` applies the reset gate after the recurrent
    product (cuDNN, PyTorch); False before it (Cho et al. 2014). Recurrent dropout as in :func:`lstm_forward`
    (the output mix uses the unmasked h_{t-1}); ``lengths``, ``weight_dropout``, ``zoneout`` and
    ``layer_norm=(gamma_x, gamma_h)`` (reset_after only; n uses the normalised R_n h inside r * (.)) as there.
    Returns ``(y, h_T, saved)``."""
    options, training = window_options(
        "gru", activation=activation, training=training, allow_tf32=allow_tf32,
        recurrent_dropout=recurrent_dropout, variational=variational, seed=seed, mask_stream=mask_stream,
        algorithm=algorithm, reset_after=reset_after, weight_dropout=weight_dropout, zoneout=zoneout,
        layer_norm=layer_norm is not None, _zoneout_sample=_zoneout_sample)
    y, h_T, _, saved = _forward("gru", options, x, W, R, bW, bR, h0, None, None, None, lengths, training,
                                stream, _packed, _layer_norm_gains("gru", layer_norm))
    return y, h_T, saved


def gru_backward(saved, dy, dh_T=None, *, stream=None, _keep=False) -> GRUGrads:
    """Exact gradients of the window from :func:`gru_forward`'s ``saved``."""
    dx, dh0, _, dW, dR, dbW, dbR, _, _, dlayer_norm = _backward("gru", saved, dy, dh_T, None, stream, _keep)
    return GRUGrads(dx, dh0, dW, dR, dbW, dbR, dlayer_norm)


def rnn_forward(x, W, R, bW, bR, h0=None, *, activation="tanh", recurrent_dropout=0.0, variational=True,
                seed=0, mask_stream=0, training=True, allow_tf32=False, algorithm="auto", lengths=None,
                weight_dropout=0.0, stream=None, _packed=False):
    """Runs a plain RNN, ``h_t = act(W x_t + bW + R h_{t-1} + bR)``, over the window ``x``. Recurrent dropout,
    ``lengths`` and ``weight_dropout`` as in :func:`lstm_forward`. Returns ``(y, h_T, saved)``."""
    options, training = window_options(
        "rnn", activation=activation, training=training, allow_tf32=allow_tf32,
        recurrent_dropout=recurrent_dropout, variational=variational, seed=seed, mask_stream=mask_stream,
        algorithm=algorithm, weight_dropout=weight_dropout)
    y, h_T, _, saved = _forward("rnn", options, x, W, R, bW, bR, h0, None, None, None, lengths, training,
                                stream, _packed)
    return y, h_T, saved


def rnn_backward(saved, dy, dh_T=None, *, stream=None, _keep=False) -> RNNGrads:
    """Exact gradients of the window from :func:`rnn_forward`'s ``saved``."""
    dx, dh0, _, dW, dR, dbW, dbR, *_ = _backward("rnn", saved, dy, dh_T, None, stream, _keep)
    return RNNGrads(dx, dh0, dW, dR, dbW, dbR)


def dropout_mask(like, shape, p, *, variational=False, seed=0, mask_stream=0, stream=None):
    """The inverted-dropout mask of docs/math.md as a new array of ``like``'s library, dtype and device:
    ``shape`` is ``(T, B, H)``, each element 0 with probability ``p`` else ``1 / (1 - p)``, drawn by a
    counter-based generator from (seed, mask_stream, batch row, unit, step), with step 0 for every t when
    ``variational``. The CPU and the GPU give the same mask for the same arguments."""
    p = check_probability("p", p)
    variational = _check_flag("variational", variational)
    seed, mask_stream = check_seed("seed", seed), check_seed("mask_stream", mask_stream)
    if len(tuple(shape)) != 3:
        raise ValueError(f"shape: expected (T, B, H), got {tuple(shape)}")
    allocate = _arrays.Allocator(like)
    out = allocate(tuple(int(n) for n in shape))
    _conveyor.dropout_mask(p, variational, seed, mask_stream, out, _arrays.stream_of(like, stream))
    return allocate.finish((out,))[0]


def _sum_of_squares(name, a) -> float:
    library = _arrays.library_of(a) if _arrays.is_foreign(a) else "numpy"
    if library == "numpy":
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating-point array, got {type(a).__name__}"
                            + (f" of dtype {a.dtype}" if isinstance(a, np.ndarray) else ""))
        return float(np.sum(np.square(a, dtype=np.float64)))
    if library == "torch":
        return float((a.detach().double() ** 2).sum())
    if library == "cupy":
        import cupy

        return float(cupy.sum(cupy.square(a.astype(cupy.float64))))
    raise TypeError(f"{name}: clip_grad_norm scales gradients in place: expected NumPy, CuPy or PyTorch "
                    f"arrays, got {type(a).__module__}.{type(a).__name__}")


def clip_grad_norm(grads, max_norm) -> float:
    """Clips gradients by their global norm (docs/math.md): ``n = sqrt(sum of squares of every gradient)``; if
    ``n > max_norm``, every gradient is scaled in place by ``max_norm / (n + 1e-6)``. Returns ``n``.

    ``grads``: a mapping (its values) or an iterable of NumPy, CuPy or PyTorch arrays (None entries are
    skipped). A NaN or infinite norm is returned as it is and nothing is scaled, so it is never hidden.
    """
    max_norm = _check_number("max_norm", max_norm, positive=True)
    if isinstance(grads, Mapping):
        items = [(f"grads[{k!r}]", v) for k, v in grads.items()]
    elif isinstance(grads, (str, bytes)) or not hasattr(grads, "__iter__"):
        raise TypeError(f"grads: expected a mapping or an iterable of arrays, got {type(grads).__name__}")
    else:
        items = [(f"grads[{i}]", v) for i, v in enumerate(grads)]
    items = [(name, a) for name, a in items if a is not None]
    norm = math.sqrt(sum(_sum_of_squares(name, a) for name, a in items))
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for _, a in items:
            if hasattr(a, "mul_"):
                a.detach().mul_(scale)
            else:
                a *= a.dtype.type(scale)
    return norm
