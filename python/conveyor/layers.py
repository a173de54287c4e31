"""Layer objects that own their parameters: ``LSTM``, ``GRU`` and ``RNN``.

Parameters carry PyTorch's state-dict names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
``bias_hh_l0``) and shapes, and are initialised as PyTorch does (uniform in +-1/sqrt(hidden_size)), so a
``torch.nn.LSTM/GRU/RNN`` state dict loads unchanged and gives the same outputs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np

from . import _conveyor, _functional

__all__ = ["GRU", "LSTM", "RNN"]

_DTYPES = (np.float32, np.float64)
_MAX_SIZE = 2**31 - 1  # sizes beyond this could not be allocated as a weight matrix anyway


def _positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive integer, got {value!r} of type {type(value).__name__}")
    if not 0 < value <= _MAX_SIZE:
        raise ValueError(f"{name}: expected an integer from 1 to {_MAX_SIZE}, got {value}")
    return int(value)


def _as_numpy(value):
    """A torch tensor (any device, requiring grad or not) or anything array-like, as a NumPy array."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class _Recurrent:
    """The parts LSTM, GRU and RNN share: parameters, gradients, state dicts, train/eval mode."""

    _cell = ""

    def __init__(self, input_size, hidden_size, *, bias=True, dtype=np.float32, seed=None):
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias: expected True or False, got {bias!r}")
        self.bias = bool(bias)
        try:
            dtype = np.dtype(dtype)
        except TypeError as error:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from error
        if dtype not in _DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        self.dtype = dtype
        self.training = True
        self._saved = None
        gh = _conveyor.gate_count(self._cell) * self.hidden_size
        shapes = {"weight_ih_l0": (gh, self.input_size), "weight_hh_l0": (gh, self.hidden_size)}
        if self.bias:
            shapes.update(bias_ih_l0=(gh,), bias_hh_l0=(gh,))
        self._shapes = shapes
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.reset_parameters(seed)

    def reset_parameters(self, seed=None) -> None:
        """Draws every parameter from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as PyTorch does."""
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.hidden_size)
        self.params = {name: rng.uniform(-bound, bound, shape).astype(self.dtype)
                       for name, shape in self._shapes.items()}
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
        return p["weight_ih_l0"], p["weight_hh_l0"], p.get("bias_ih_l0"), p.get("bias_hh_l0")

    def _store_grads(self, grads) -> None:
        self.grads = {"weight_ih_l0": grads.dW, "weight_hh_l0": grads.dR}
        if self.bias:
            self.grads.update(bias_ih_l0=grads.dbW, bias_hh_l0=grads.dbR)

    def _check_input(self, x) -> None:
        """Blames x, not the weights, when x does not fit the layer."""
        if isinstance(x, np.ndarray) and x.ndim == 3:
            if x.shape[2] != self.input_size:
                raise ValueError(f"x: expected [T, B, input_size] with input_size {self.input_size}, "
                                 f"got shape {x.shape}")
            if x.dtype != self.dtype:
                raise TypeError(f"x: expected dtype {self.dtype} (the layer's dtype), got {x.dtype}")

    def _backward(self, backward, *grads):
        """Runs `backward` on the pending forward pass; a rejected call leaves that pass pending."""
        if self._saved is None:
            raise ValueError("backward: no forward pass to go back through (call forward in training mode "
                             "first; each forward serves one backward)")
        result = backward(self._saved, *grads)
        self._saved = None
        self._store_grads(result)
        return result

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, bias={self.bias}, "
                f"dtype={self.dtype}{self._extra_repr()})")

    def _extra_repr(self) -> str:
        return ""


class LSTM(_Recurrent):
    """One LSTM layer over windows of ``[T, B, input_size]``.

    ``forward(x, h0=None, c0=None) -> (y, h_T, c_T)``; in training mode it keeps what
    ``backward(dy, dh_T=None, dc_T=None) -> (dx, dh0, dc0)`` needs, and backward stores the parameter
    gradients in ``grads`` under the parameters' names.
    """

    _cell = "lstm"

    def __init__(self, input_size, hidden_size, *, bias=True, activation="tanh", dtype=np.float32, seed=None):
        self.activation = _functional._check_activation(activation)
        super().__init__(input_size, hidden_size, bias=bias, dtype=dtype, seed=seed)

    def forward(self, x, h0=None, c0=None):
        self._check_input(x)
        y, h_T, c_T, self._saved = _functional.lstm_forward(
            x, *self._weights(), h0, c0, activation=self.activation, training=self.training)
        return y, h_T, c_T

    def backward(self, dy, dh_T=None, dc_T=None):
        grads = self._backward(_functional.lstm_backward, dy, dh_T, dc_T)
        return grads.dx, grads.dh0, grads.dc0

    def _extra_repr(self) -> str:
        return f", activation={self.activation!r}"


class GRU(_Recurrent):
    """One GRU layer; ``reset_after=True`` is PyTorch's and cuDNN's variant, False Cho et al.'s (2014).

    ``forward(x, h0=None) -> (y, h_T)``; ``backward(dy, dh_T=None) -> (dx, dh0)``.
    """

    _cell = "gru"

    def __init__(self, input_size, hidden_size, *, bias=True, reset_after=True, activation="tanh",
                 dtype=np.float32, seed=None):
        self.reset_after = _functional._check_flag("reset_after", reset_after)
        self.activation = _functional._check_activation(activation)
        super().__init__(input_size, hidden_size, bias=bias, dtype=dtype, seed=seed)

    def forward(self, x, h0=None):
        self._check_input(x)
        y, h_T, self._saved = _functional.gru_forward(x, *self._weights(), h0, reset_after=self.reset_after,
                                                      activation=self.activation, training=self.training)
        return y, h_T

    def backward(self, dy, dh_T=None):
        grads = self._backward(_functional.gru_backward, dy, dh_T)
        return grads.dx, grads.dh0

    def _extra_repr(self) -> str:
        return f", reset_after={self.reset_after}, activation={self.activation!r}"


class RNN(_Recurrent):
    """One plain RNN layer, ``h_t = act(W x_t + bW + R h_{t-1} + bR)``, with ``activation`` (PyTorch's
    ``nonlinearity``) ``"tanh"`` or ``"relu"``.

    ``forward(x, h0=None) -> (y, h_T)``; ``backward(dy, dh_T=None) -> (dx, dh0)``.
    """

    _cell = "rnn"

    def __init__(self, input_size, hidden_size, *, bias=True, activation="tanh", dtype=np.float32, seed=None):
        self.activation = _functional._check_activation(activation)
        super().__init__(input_size, hidden_size, bias=bias, dtype=dtype, seed=seed)

    def forward(self, x, h0=None):
        self._check_input(x)
        y, h_T, self._saved = _functional.rnn_forward(x, *self._weights(), h0, activation=self.activation,
                                                      training=self.training)
        return y, h_T

    def backward(self, dy, dh_T=None):
        grads = self._backward(_functional.rnn_backward, dy, dh_T)
        return grads.dx, grads.dh0

    def _extra_repr(self) -> str:
        return f", activation={self.activation!r}"
