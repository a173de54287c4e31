"""Layer objects that own their parameters: ``LSTM``, ``GRU`` and ``RNN``, with every variant of docs/math.md.

Parameters carry PyTorch's state-dict names and shapes (``weight_ih_l{k}``, ``weight_hh_l{k}``,
``bias_ih_l{k}``, ``bias_hh_l{k}``, with ``_reverse`` for the backward direction) and are initialised as
PyTorch does (uniform in +-1/sqrt(hidden_size)), so a ``torch.nn.LSTM/GRU/RNN`` state dict with the same
``num_layers`` and ``bidirectional`` loads unchanged and gives the same outputs. Peephole weights, which
PyTorch has not, are ``weight_peephole_l{k}`` ``[3, hidden_size]`` (p_i, p_f, p_o). States are
``[num_layers * directions, B, hidden_size]``, as PyTorch's. An LSTM with ``proj_size > 0`` (LSTMP) has
PyTorch's ``weight_hr_l{k}`` ``[proj_size, hidden_size]`` too; its h states and outputs then have proj_size
units. With ``layer_norm=True`` the LSTM and the GRU have the gains ``layernorm_x_l{k}`` and
``layernorm_h_l{k}`` ``[G*hidden_size]`` (initialised to 1), and the LSTM ``layernorm_c_weight_l{k}`` and
``layernorm_c_bias_l{k}`` ``[hidden_size]`` (1 and 0).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np

from . import _conveyor, _functional, _stack

__all__ = ["GRU", "LSTM", "RNN"]

_DTYPES = (np.float32, np.float64)
_MAX_SIZE = 2**31 - 1  # sizes beyond this could not be allocated as a weight matrix anyway


def _positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive integer, got {value!r} of type {type(value).__name__}")
    if not 0 < value <= _MAX_SIZE:
        raise ValueError(f"{name}: expected an integer from 1 to {_MAX_SIZE}, got {value}")
    return int(value)


def _proj_size(value, hidden_size) -> int:
    """PyTorch's rule: 0 (no projection) or 0 < proj_size < hidden_size."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"proj_size: expected a non-negative integer, got {value!r} of type "
                        f"{type(value).__name__}")
    if not 0 <= value < hidden_size:
        raise ValueError(f"proj_size: expected 0 (no projection) or an integer from 1 to hidden_size - 1 = "
                         f"{hidden_size - 1}, got {value}")
    return int(value)


def _as_numpy(value):
    """A torch tensor (any device, requiring grad or not) or anything array-like, as a NumPy array."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class _Recurrent:
    """The parts LSTM, GRU and RNN share: parameters, gradients, state dicts, train/eval mode, stacks."""

    _cell = ""

    def __init__(self, input_size, hidden_size, *, num_layers=1, bias=True, bidirectional=False, dropout=0.0,
                 variational=False, recurrent_dropout=0.0, activation="tanh", dtype=np.float32, seed=None,
                 cell_options=None, peephole=False, proj_size=0, layer_norm=False, weight_dropout=0.0,
                 zoneout=0.0, zoneout_cell=0.0):
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.proj_size = _proj_size(proj_size, self.hidden_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias: expected True or False, got {bias!r}")
        self.bias = bool(bias)
        self.bidirectional = _functional._check_flag("bidirectional", bidirectional)
        self.dropout = _functional.check_probability("dropout", dropout)
        self.variational = _functional._check_flag("variational", variational)
        self.recurrent_dropout = _functional.check_probability("recurrent_dropout", recurrent_dropout)
        self.activation = _functional._check_activation(activation)
        self.peephole = _functional._check_flag("peephole", peephole)
        self.layer_norm = _functional._check_flag("layer_norm", layer_norm)
        self._cell_options = dict(cell_options or {})
        # The regularisers (docs/math.md, "Regularisers"): window options, each left out when off.
        for name, value in (("weight_dropout", weight_dropout), ("zoneout", zoneout),
                            ("zoneout_cell", zoneout_cell)):
            if _functional.check_probability(name, value) > 0:
                self._cell_options[name] = float(value)
        try:
            dtype = np.dtype(dtype)
        except TypeError as error:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from error
        if dtype not in _DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        self.dtype = dtype
        self.training = True
        self._saved = None
        self._windows = 0  # training windows run so far: each draws fresh dropout masks
        self._dropout_seed = int(np.random.default_rng(seed).integers(2**63))
        gate_options = {"coupled_gates": self._cell_options.get("coupled_gates", False)}
        gh = _conveyor.gate_count(self._cell, gate_options) * self.hidden_size
        directions = 2 if self.bidirectional else 1
        units = self.state_size
        shapes = {}
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else directions * units
            for suffix in ("", "_reverse")[:directions]:
                shapes[f"weight_ih_l{layer}{suffix}"] = (gh, layer_input)
                shapes[f"weight_hh_l{layer}{suffix}"] = (gh, units)
                if self.bias:
                    shapes[f"bias_ih_l{layer}{suffix}"] = (gh,)
                    shapes[f"bias_hh_l{layer}{suffix}"] = (gh,)
                if self.peephole:
                    shapes[f"weight_peephole_l{layer}{suffix}"] = (3, self.hidden_size)
                if self.proj_size:
                    shapes[f"weight_hr_l{layer}{suffix}"] = (self.proj_size, self.hidden_size)
                if self.layer_norm:
                    shapes[f"layernorm_x_l{layer}{suffix}"] = (gh,)
                    shapes[f"layernorm_h_l{layer}{suffix}"] = (gh,)
                    if self._cell == "lstm":
                        shapes[f"layernorm_c_weight_l{layer}{suffix}"] = (self.hidden_size,)
                        shapes[f"layernorm_c_bias_l{layer}{suffix}"] = (self.hidden_size,)
        self._shapes = shapes
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.reset_parameters(seed)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def state_size(self) -> int:
        """The units of the h states and of each direction's output: proj_size with a projection, else
        hidden_size."""
        return self.proj_size or self.hidden_size

    def _names(self):
        """(suffix of the parameter names) per layer and direction, layer-major."""
        return [f"l{layer}{suffix}" for layer in range(self.num_layers)
                for suffix in ("", "_reverse")[:self.directions]]

    def reset_parameters(self, seed=None) -> None:
        """Draws every weight from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as PyTorch does; layer-norm
        gains start at 1 and biases at 0 (Ba et al. 2016)."""
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.hidden_size)
        self.params = {}
        for name, shape in self._shapes.items():
            if name.startswith("layernorm_"):
                value = np.full(shape, 0.0 if name.startswith("layernorm_c_bias") else 1.0)
            else:
                value = rng.uniform(-bound, bound, shape)
            self.params[name] = value.astype(self.dtype)
        self.grads = {}

    # -- state dicts --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self.params.items()}

    def load_state_dict(self, state) -> None:
        """Loads parameters by PyTorch's names; accepts NumPy arrays or torch tensors. Every name must be
        present with its exact shape; unknown names are an error."""
        if not isinstance(state, Mapping):
            raise TypeError("state: expected a mapping of parameter names to arrays, "
                            f"got {type(state).__name__}")
        missing = sorted(set(self._shapes) - set(state))
        unexpected = sorted(set(state) - set(self._shapes))
        if missing or unexpected:
            raise ValueError(f"state: missing keys {missing}, unexpected keys {unexpected}")
        loaded = {}
        for name, shape in self._shapes.items():
            value = _as_numpy(state[name])
            if value.shape != shape:
                raise ValueError(f"state[{name!r}]: expected shape {shape}, got {value.shape}")
            loaded[name] = np.ascontiguousarray(value, dtype=self.dtype)
        self.params = loaded
        self.grads = {}

    def parameters(self) -> list[np.ndarray]:
        return list(self.params.values())

    # -- modes --------------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- forward and backward -----------------------------------------------------------------------------
    def _weights(self):
        p = self.params
        weights = []
        for name in self._names():
            entry = (p[f"weight_ih_{name}"], p[f"weight_hh_{name}"], p.get(f"bias_ih_{name}"),
                     p.get(f"bias_hh_{name}"))
            if self._cell == "lstm":
                entry += (p.get(f"weight_peephole_{name}"), p.get(f"weight_hr_{name}"))
            if self.layer_norm:
                entry += tuple(p[f"layernorm_{gain}_{name}"] for gain in self._gain_names())
            weights.append(entry)
        return weights

    def _gain_names(self):
        return ("x", "h", "c_weight", "c_bias") if self._cell == "lstm" else ("x", "h")

    def _check_input(self, x) -> None:
        """Blames x, not the weights, when x does not fit the layer."""
        if isinstance(x, np.ndarray) and x.ndim == 3:
            if x.shape[2] != self.input_size:
                raise ValueError(f"x: expected [T, B, input_size] with input_size {self.input_size}, "
                                 f"got shape {x.shape}")
            if x.dtype != self.dtype:
                raise TypeError(f"x: expected dtype {self.dtype} (the layer's dtype), got {x.dtype}")

    def _window(self, x, h0, c0, lengths=None):
        """One window through the stack: (y, h_n, c_n, saved); each training window draws fresh masks."""
        self._check_input(x)
        if self.training:
            self._windows += 1
        return _stack.stack_forward(
            self._cell, x, self._weights(), h0, c0, num_layers=self.num_layers,
            bidirectional=self.bidirectional, dropout=self.dropout, variational=self.variational,
            recurrent_dropout=self.recurrent_dropout, seed=(self._dropout_seed + self._windows) % 2**64,
            training=self.training, activation=self.activation, lengths=lengths, **self._cell_options)

    def _forward(self, x, h0, c0, lengths):
        y, h_n, c_n, self._saved = self._window(x, h0, c0, lengths)
        return y, h_n, c_n

    def _named_grads(self, result) -> dict:
        """The parameter gradients of a StackGrads, by parameter name."""
        grads = {}
        for name, g in zip(self._names(), result.weights):
            grads[f"weight_ih_{name}"], grads[f"weight_hh_{name}"] = g.dW, g.dR
            if self.bias:
                grads[f"bias_ih_{name}"], grads[f"bias_hh_{name}"] = g.dbW, g.dbR
            if self.peephole:
                grads[f"weight_peephole_{name}"] = g.dP
            if self.proj_size:
                grads[f"weight_hr_{name}"] = g.dW_hr
            if self.layer_norm:
                for gain, d in zip(self._gain_names(), g.dlayer_norm):
                    grads[f"layernorm_{gain}_{name}"] = d
        return grads

    def _backward(self, dy, dh_n, dc_n):
        """Backward through the pending forward pass; a rejected call leaves that pass pending."""
        if self._saved is None:
            raise ValueError("backward: no forward pass to go back through (call forward in training mode "
                             "first; each forward serves one backward)")
        result = _stack.stack_backward(self._saved, dy, dh_n, dc_n)
        self._saved = None
        self.grads = self._named_grads(result)
        return result

    def to(self, device: str):
        """Moves the parameters (and drops the gradients) to ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy, the
        current device): the windows then run where the parameters are."""
        if device == "cpu":
            self.params = {k: v if isinstance(v, np.ndarray) else v.get() for k, v in self.params.items()}
        elif device == "cuda":
            try:
                import cupy
            except ImportError as error:
                raise ValueError("device: 'cuda' needs CuPy (pip install cupy-cuda12x)") from error
            self.params = {k: cupy.asarray(v) for k, v in self.params.items()}
        else:
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        self.grads = {}
        return self

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        options = [f"bias={self.bias}", f"dtype={self.dtype}"]
        if self.num_layers != 1:
            options.append(f"num_layers={self.num_layers}")
        for name in ("bidirectional", "peephole", "variational", "layer_norm"):
            if getattr(self, name):
                options.append(f"{name}=True")
        for name in ("dropout", "recurrent_dropout", "proj_size"):
            if getattr(self, name):
                options.append(f"{name}={getattr(self, name)}")
        options += [f"{k}={v!r}" for k, v in self._cell_options.items()]
        options.append(f"activation={self.activation!r}")
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}, {', '.join(options)})"


class LSTM(_Recurrent):
    """An LSTM stack over windows of ``[T, B, input_size]``.

    ``forward(x, h0=None, c0=None, lengths=None) -> (y, h_n, c_n)`` with ``y`` ``[T, B, D*hidden_size]`` and
    states ``[num_layers*D, B, hidden_size]``; in training mode it keeps what ``backward(dy, dh_n=None,
    dc_n=None) -> (dx, dh0, dc0)`` needs, and backward stores the parameter gradients in ``grads`` by name.
    ``lengths`` (``[B]``, every layer's forward): row b runs its first lengths[b] steps only (docs/math.md,
    "Variable lengths"); h_n holds each row's state after them, y is 0 past them.

    Options (docs/math.md; the README names the papers): ``num_layers``, ``bidirectional``, ``dropout``
    (between layers), ``variational`` (dropout masks shared over time), ``recurrent_dropout`` (on h_{t-1}
    inside the recurrent product), ``peephole``, ``coupled_gates``, ``forget_bias``, ``cell_clip``,
    ``activation``, ``proj_size`` (LSTMP as PyTorch's: ``0 < proj_size < hidden_size`` projects each h_t to
    that many units with ``weight_hr_l{k}``; y and the h states then have proj_size units, c keeps
    hidden_size); the regularisers ``layer_norm``, ``weight_dropout`` (DropConnect on R, AWD-LSTM's weight
    drop), ``zoneout`` and ``zoneout_cell`` (docs/math.md, "Regularisers").
    """

    _cell = "lstm"

    def __init__(self, input_size, hidden_size, *, num_layers=1, bias=True, bidirectional=False,
                 dropout=0.0, variational=False, recurrent_dropout=0.0, peephole=False, coupled_gates=False,
                 forget_bias=0.0, cell_clip=None, activation="tanh", proj_size=0, layer_norm=False,
                 weight_dropout=0.0, zoneout=0.0, zoneout_cell=0.0, dtype=np.float32, seed=None):
        options = {"coupled_gates": _functional._check_flag("coupled_gates", coupled_gates)}
        if forget_bias != 0.0:
            options["forget_bias"] = _functional._check_number("forget_bias", forget_bias)
        if cell_clip is not None:
            options["cell_clip"] = _functional._check_number("cell_clip", cell_clip, positive=True)
        super().__init__(input_size, hidden_size, num_layers=num_layers, bias=bias,
                         bidirectional=bidirectional, dropout=dropout, variational=variational,
                         recurrent_dropout=recurrent_dropout, activation=activation, dtype=dtype, seed=seed,
                         cell_options=options, peephole=peephole, proj_size=proj_size, layer_norm=layer_norm,
                         weight_dropout=weight_dropout, zoneout=zoneout, zoneout_cell=zoneout_cell)
        if not coupled_gates:
            del self._cell_options["coupled_gates"]

    def forward(self, x, h0=None, c0=None, lengths=None):
        return self._forward(x, h0, c0, lengths)

    def backward(self, dy, dh_n=None, dc_n=None):
        grads = self._backward(dy, dh_n, dc_n)
        return grads.dx, grads.dh0, grads.dc0


class GRU(_Recurrent):
    """A GRU stack; ``reset_after=True`` is PyTorch's and cuDNN's variant, False Cho et al.'s (2014).

    ``forward(x, h0=None, lengths=None) -> (y, h_n)``; ``backward(dy, dh_n=None) -> (dx, dh0)``. Options
    and ``lengths`` as the LSTM's but for the LSTM-only ones (``layer_norm`` with reset_after only).
    """

    _cell = "gru"

    def __init__(self, input_size, hidden_size, *, num_layers=1, bias=True, bidirectional=False,
                 dropout=0.0, variational=False, recurrent_dropout=0.0, reset_after=True, activation="tanh",
                 layer_norm=False, weight_dropout=0.0, zoneout=0.0, dtype=np.float32, seed=None):
        self.reset_after = _functional._check_flag("reset_after", reset_after)
        if layer_norm and not self.reset_after:
            raise ValueError("layer_norm: the GRU with reset_after=False has no layer-normalised form (as in "
                             "Haste)")
        super().__init__(input_size, hidden_size, num_layers=num_layers, bias=bias,
                         bidirectional=bidirectional, dropout=dropout, variational=variational,
                         recurrent_dropout=recurrent_dropout, activation=activation, dtype=dtype, seed=seed,
                         cell_options={"reset_after": self.reset_after}, layer_norm=layer_norm,
                         weight_dropout=weight_dropout, zoneout=zoneout)

    def forward(self, x, h0=None, lengths=None):
        y, h_n, _ = self._forward(x, h0, None, lengths)
        return y, h_n

    def backward(self, dy, dh_n=None):
        grads = self._backward(dy, dh_n, None)
        return grads.dx, grads.dh0


class RNN(_Recurrent):
    """A plain RNN stack, ``h_t = act(W x_t + bW + R h_{t-1} + bR)``, with ``activation`` (PyTorch's
    ``nonlinearity``) ``"tanh"`` or ``"relu"``.

    ``forward(x, h0=None, lengths=None) -> (y, h_n)``; ``backward(dy, dh_n=None) -> (dx, dh0)``; option
    ``weight_dropout`` as the LSTM's.
    """

    _cell = "rnn"

    def __init__(self, input_size, hidden_size, *, num_layers=1, bias=True, bidirectional=False,
                 dropout=0.0, variational=False, recurrent_dropout=0.0, activation="tanh", weight_dropout=0.0,
                 dtype=np.float32, seed=None):
        super().__init__(input_size, hidden_size, num_layers=num_layers, bias=bias,
                         bidirectional=bidirectional, dropout=dropout, variational=variational,
                         recurrent_dropout=recurrent_dropout, activation=activation, dtype=dtype, seed=seed,
                         weight_dropout=weight_dropout)

    def forward(self, x, h0=None, lengths=None):
        y, h_n, _ = self._forward(x, h0, None, lengths)
        return y, h_n

    def backward(self, dy, dh_n=None):
        grads = self._backward(dy, dh_n, None)
        return grads.dx, grads.dh0
