"""The regularisers above the functional API: the layer objects (parameters, their initialisation, the masks'
seeds and streams, gradients of stacks by finite differences), TBPTT, and ``conveyor train``'s flags
(``conveyor.torch`` and Haste's state dicts: test_regularisers_torch.py)."""

import subprocess
import sys

import numpy as np
import pytest

import conveyor
from conveyor import _stack

import reference as ref
from support import assert_close


def test_layer_parameters_and_their_initialisation():
    layer = conveyor.LSTM(3, 5, num_layers=2, bidirectional=True, layer_norm=True, dtype=np.float64, seed=0)
    for name in ("l0", "l1_reverse"):
        np.testing.assert_array_equal(layer.params[f"layernorm_x_{name}"], np.ones(20))
        np.testing.assert_array_equal(layer.params[f"layernorm_h_{name}"], np.ones(20))
        np.testing.assert_array_equal(layer.params[f"layernorm_c_weight_{name}"], np.ones(5))
        np.testing.assert_array_equal(layer.params[f"layernorm_c_bias_{name}"], np.zeros(5))
    gru = conveyor.GRU(3, 4, layer_norm=True)
    assert sorted(k for k in gru.params if k.startswith("layernorm")) == ["layernorm_h_l0", "layernorm_x_l0"]
    assert "layer_norm=True" in repr(gru) and "zoneout=0.2" in repr(conveyor.GRU(3, 4, zoneout=0.2))
    with pytest.raises(ValueError, match="layer_norm: the GRU with reset_after=False"):
        conveyor.GRU(3, 4, layer_norm=True, reset_after=False)
    with pytest.raises(TypeError, match="layer_norm"):
        conveyor.RNN(3, 4, layer_norm=True)
    with pytest.raises(ValueError, match=r"zoneout: expected a probability in \[0, 1\), got 1.5"):
        conveyor.LSTM(3, 4, zoneout=1.5)


def test_a_training_window_draws_the_documented_masks(rng):
    """One layer, one direction: the reference with the masks of seed (the layer's seed + its windows) and the
    streams mask_stream(0, 0, kind): kind 2 DropConnect, 3 zoneout of h, 4 of c; the gains random."""
    T, B, I, H = 5, 3, 4, 6
    layer = conveyor.LSTM(I, H, layer_norm=True, weight_dropout=0.3, zoneout=0.2, zoneout_cell=0.25,
                          dtype=np.float64, seed=7)
    for name in layer.params:
        if name.startswith("layernorm"):
            layer.params[name] = layer.params[name] + rng.uniform(-0.3, 0.3, layer.params[name].shape)
    x = rng.uniform(-1, 1, (T, B, I))
    y, h_n, c_n = layer.forward(x)
    dy = rng.uniform(-1, 1, y.shape)
    dx, _, _ = layer.backward(dy)
    seed = (layer._dropout_seed + 1) % 2**64
    p = layer.params
    keep = {name: (ref.dropout_mask(z, False, seed, _stack.mask_stream(0, 0, kind), (T, B, H)) == 0) * 1.0
            for name, z, kind in (("zoneout", 0.2, 3), ("zoneout_cell", 0.25, 4))}
    weight_mask = ref.dropout_mask(0.3, True, seed, _stack.mask_stream(0, 0, 2), (1, 4 * H, H))[0]
    ry, rh, rc, cache = ref.lstm_forward(
        x, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"], np.zeros((B, H)),
        np.zeros((B, H)), weight_mask=weight_mask,
        gamma_x=p["layernorm_x_l0"], gamma_h=p["layernorm_h_l0"], gamma_c=p["layernorm_c_weight_l0"],
        beta_c=p["layernorm_c_bias_l0"], **keep)
    assert_close("y", y, ry, np.float64)
    assert_close("c_n", c_n[0], rc, np.float64)
    *grads, d_gains = ref.lstm_backward(cache, dy, np.zeros((B, H)), np.zeros((B, H)))
    assert_close("dx", dx, grads[0], np.float64)
    assert_close("dR", layer.grads["weight_hh_l0"], grads[4], np.float64)
    for gain, name in (("gamma_x", "x"), ("gamma_h", "h"), ("gamma_c", "c_weight"), ("beta_c", "c_bias")):
        assert_close(gain, layer.grads[f"layernorm_{name}_l0"], d_gains[gain], np.float64)
    # The next training window draws new masks: the same input gives other outputs.
    assert np.abs(layer.forward(x)[0] - y).max() > 1e-6


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_stack_gradients_match_finite_differences(cell, rng):
    """A 2-layer bidirectional stack with layer norm and zoneout in evaluation mode (zoneout's expectation, so
    every call is the same function): every parameter's gradient against central differences."""
    options = dict(zoneout=0.3) | ({"zoneout_cell": 0.2} if cell == "lstm" else {})
    layer = getattr(conveyor, cell.upper())(3, 4, num_layers=2, bidirectional=True, layer_norm=True,
                                            dtype=np.float64, seed=1, **options)
    for name in layer.params:
        layer.params[name] = layer.params[name] + rng.uniform(-0.2, 0.2, layer.params[name].shape)
    layer.eval()
    x, dy = rng.uniform(-1, 1, (4, 2, 3)), rng.uniform(-1, 1, (4, 2, 8))
    saved = _stack.stack_forward(cell, x, layer._weights(), num_layers=2, bidirectional=True, training=True,
                                 seed=3, **layer._cell_options, _zoneout_sample=False)[-1]
    grads = layer._named_grads(_stack.stack_backward(saved, dy))
    eps = 1e-6
    for name in ("layernorm_x_l0", "layernorm_h_l1_reverse", "weight_hh_l1", "bias_ih_l0_reverse"):
        value = layer.params[name]
        for index in [tuple(rng.integers(0, n) for n in value.shape) for _ in range(3)]:
            original = value[index]
            value[index] = original + eps
            plus = np.sum(layer.forward(x)[0] * dy)
            value[index] = original - eps
            minus = np.sum(layer.forward(x)[0] * dy)
            value[index] = original
            numeric = (plus - minus) / (2 * eps)
            assert abs(grads[name][index] - numeric) <= 1e-7 + 1e-5 * abs(numeric), (name, index)


def test_tbptt_with_the_regularisers_in_evaluation_equals_one_call(rng):
    layer = conveyor.LSTM(3, 5, num_layers=2, layer_norm=True, zoneout=0.2, zoneout_cell=0.1,
                          weight_dropout=0.3, dtype=np.float64, seed=2)
    x = rng.uniform(-1, 1, (12, 2, 3))
    whole = layer.eval().forward(x)[0]
    driver = conveyor.TBPTT(layer, 4)
    parts = [driver.forward(x[t:t + 4]) for t in range(0, 12, 4)]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-13, atol=1e-14)
    layer.train()
    driver = conveyor.TBPTT(layer, 4)
    for t in range(0, 12, 4):
        driver.backward(np.ones_like(driver.forward(x[t:t + 4])))
    assert all(np.all(np.isfinite(g)) for g in layer.grads.values()) and "layernorm_c_bias_l1" in layer.grads


# ------------------------------------------------------------------------------------------ conveyor train


def test_train_takes_the_regularisers_flags(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 60)
    common = [sys.executable, "-m", "conveyor", "train", "--data", str(text), "--layers", "1",
              "--hidden", "16", "--embedding", "8", "--batch", "4", "--bptt", "8", "--sample", "0",
              "--eval-every", "0", "--max-steps", "3"]
    out = subprocess.run(common + ["--layer-norm", "--zoneout", "0.1", "--zoneout-cell", "0.2",
                                   "--weight-dropout", "0.3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(common + ["--cell", "rnn", "--layer-norm"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("--layer-norm: an option of --cell lstm and gru, not rnn")
