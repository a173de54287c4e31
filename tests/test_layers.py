"""The layer objects: parameters named, shaped and initialised as PyTorch's, forward/backward equal to the
functional API, gradients stored by name, train/eval modes, state dicts."""

import numpy as np
import pytest

import conveyor
from conveyor import GRU, LSTM, RNN

LAYERS = [(LSTM, 4, {}), (GRU, 3, {"reset_after": True}), (GRU, 3, {"reset_after": False}),
          (RNN, 1, {"activation": "relu"})]
LAYER_IDS = ["lstm", "gru", "gru-reset-before", "rnn-relu"]


@pytest.mark.parametrize(("cls", "gates", "options"), LAYERS, ids=LAYER_IDS)
def test_parameters_follow_pytorch(cls, gates, options):
    layer = cls(7, 12, seed=3, **options)
    shapes = {name: p.shape for name, p in layer.state_dict().items()}
    assert shapes == {"weight_ih_l0": (gates * 12, 7), "weight_hh_l0": (gates * 12, 12),
                      "bias_ih_l0": (gates * 12,), "bias_hh_l0": (gates * 12,)}
    values = np.concatenate([p.ravel() for p in layer.parameters()])
    bound = 1 / np.sqrt(12)
    assert np.all(np.abs(values) <= bound)
    # Uniform on [-b, b]: mean 0 and standard deviation b / sqrt(3), within sampling error.
    assert abs(values.mean()) < 0.1 * bound
    assert abs(values.std() - bound / np.sqrt(3)) < 0.1 * bound
    assert all(p.dtype == np.float32 for p in layer.parameters())


def test_seed_makes_initialisation_reproducible():
    a, b, c = LSTM(3, 4, seed=1), LSTM(3, 4, seed=1), LSTM(3, 4, seed=2)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
        assert not np.array_equal(a.params[name], c.params[name])


def _run_functional(layer, x, h0, dy):
    p = layer.params
    args = (x, p["weight_ih_l0"], p["weight_hh_l0"], p.get("bias_ih_l0"), p.get("bias_hh_l0"), h0)
    if isinstance(layer, LSTM):
        y, h_T, _, saved = conveyor.lstm_forward(*args, activation=layer.activation)
        return y, conveyor.lstm_backward(saved, dy)
    if isinstance(layer, GRU):
        y, h_T, saved = conveyor.gru_forward(*args, reset_after=layer.reset_after,
                                             activation=layer.activation)
        return y, conveyor.gru_backward(saved, dy)
    y, h_T, saved = conveyor.rnn_forward(*args, activation=layer.activation)
    return y, conveyor.rnn_backward(saved, dy)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("cls", "gates", "options"), LAYERS, ids=LAYER_IDS)
def test_forward_backward_equal_the_functional_api(cls, gates, options, bias, rng):
    layer = cls(5, 6, bias=bias, dtype=np.float64, seed=0, **options)
    x = rng.standard_normal((4, 3, 5))
    h0 = rng.standard_normal((3, 6))
    dy = rng.standard_normal((4, 3, 6))
    outputs = layer(x, h0[None])  # states are [num_layers * directions, B, H]
    dx = layer.backward(dy)[0]
    y, grads = _run_functional(layer, x, h0, dy)
    np.testing.assert_array_equal(outputs[0], y)
    np.testing.assert_array_equal(dx, grads.dx)
    expected = {"weight_ih_l0": grads.dW, "weight_hh_l0": grads.dR}
    if bias:
        expected.update(bias_ih_l0=grads.dbW, bias_hh_l0=grads.dbR)
    assert set(layer.grads) == set(expected) == set(layer.params)
    for name, g in expected.items():
        np.testing.assert_array_equal(layer.grads[name], g, err_msg=name)


def test_lstm_returns_both_final_states(rng):
    layer = LSTM(3, 4, seed=0)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    y, h_n, c_n = layer(x)
    np.testing.assert_array_equal(h_n[0], y[-1])
    assert h_n.shape == c_n.shape == (1, 2, 4)
    dx, dh0, dc0 = layer.backward(np.ones_like(y))
    assert dx.shape == x.shape and dh0.shape == (1, 2, 4) and dc0.shape == (1, 2, 4)


def test_eval_mode_keeps_nothing_for_backward(rng):
    layer = GRU(3, 4, seed=0).eval()
    y, _ = layer(rng.standard_normal((5, 2, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="backward"):
        layer.backward(np.ones_like(y))
    layer.train()
    y, _ = layer(rng.standard_normal((5, 2, 3)).astype(np.float32))
    layer.backward(np.ones_like(y))


def test_each_forward_serves_one_backward(rng):
    layer = RNN(3, 4, seed=0)
    y, _ = layer(rng.standard_normal((5, 2, 3)).astype(np.float32))
    layer.backward(np.ones_like(y))
    with pytest.raises(ValueError, match="backward"):
        layer.backward(np.ones_like(y))


def test_state_dict_round_trip(rng):
    a, b = LSTM(3, 4, seed=1), LSTM(3, 4, seed=2)
    b.load_state_dict(a.state_dict())
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(a(x)[0], b(x)[0])
    # state_dict hands out copies: changing one does not change the layer.
    state = a.state_dict()
    state["weight_ih_l0"][:] = 0
    assert np.any(a.params["weight_ih_l0"] != 0)


def test_float64_layer(rng):
    layer = GRU(3, 4, dtype=np.float64, seed=0)
    assert all(p.dtype == np.float64 for p in layer.parameters())
    y, _ = layer(rng.standard_normal((2, 1, 3)))
    assert y.dtype == np.float64


def test_repr_names_the_options():
    assert repr(GRU(3, 4, reset_after=False)) == (
        "GRU(3, 4, bias=True, dtype=float32, reset_after=False, activation='tanh')")
