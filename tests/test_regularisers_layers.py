"""The regularisers above the functional API: the layer objects (parameters, their initialisation, the masks'
seeds and streams, gradients of stacks by finite differences), ``conveyor.torch`` (names, outputs equal to the
layers', gradcheck, torch.compile), Haste's state dicts both ways (outputs of Haste's equations), TBPTT, and
``conveyor train``'s flags."""

import subprocess
import sys

import numpy as np
import pytest

import conveyor
from conveyor import _stack, haste

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


# ------------------------------------------------------------------------------------------- conveyor.torch


torch = pytest.importorskip("torch")
ct = pytest.importorskip("conveyor.torch")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropin_names_and_outputs_equal_the_layers(cell):
    torch.manual_seed(0)
    options = dict(layer_norm=True, zoneout=0.2, weight_dropout=0.3)
    if cell == "lstm":
        options["zoneout_cell"] = 0.1
    module = getattr(ct, cell.upper())(3, 5, num_layers=2, bidirectional=True, **options).double()
    layer = getattr(conveyor, cell.upper())(3, 5, num_layers=2, bidirectional=True, dtype=np.float64,
                                            **options)
    assert list(module.state_dict()) == list(layer.state_dict())
    assert "layernorm_h_l1_reverse" in module._flat_weights_names
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.rand_like(p) * 0.4 - 0.2)
    layer.load_state_dict(module.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    module.eval()
    expected = layer.eval().forward(x.numpy())
    got = module(x)
    np.testing.assert_allclose(got[0].detach().numpy(), expected[0], rtol=1e-12, atol=1e-13)
    module.train()
    trained = module(x)[0]
    assert torch.isfinite(trained).all() and (trained - got[0]).abs().max() > 1e-6
    trained.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_dropin_gradcheck_with_every_regulariser():
    """In evaluation (zoneout's expectation: every call the same function), gradcheck of the output with
    respect to x, the states and every layer-norm gain, with a projection and two layers."""
    torch.manual_seed(1)
    m = ct.LSTM(3, 4, num_layers=2, layer_norm=True, zoneout=0.3, zoneout_cell=0.2, weight_dropout=0.3,
                proj_size=2).double().eval()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in m.named_parameters() if name.startswith("layernorm")]
    assert len(names) == 8
    gains = [(getattr(m, name).detach() + 0.2 * torch.randn_like(getattr(m, name))).requires_grad_()
             for name in names]

    def output(x, h0, c0, *values):
        return torch.func.functional_call(m, dict(zip(names, values)), (x, (h0, c0)))[0]

    assert torch.autograd.gradcheck(output, (x, h0, c0, *gains))


def test_torch_compile_keeps_one_graph_with_the_regularisers():
    torch.manual_seed(2)
    layer = ct.LSTM(3, 5, layer_norm=True, zoneout=0.1, zoneout_cell=0.1, weight_dropout=0.2).eval()
    x = torch.randn(6, 4, 3)
    explained = torch._dynamo.explain(lambda x: layer(x)[0])(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(lambda x: layer(x)[0], backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x)[0])


# ------------------------------------------------------------------------------------------------------ Haste


def haste_lstm(x, s):
    """Haste's LayerNormLSTM equations (its documentation and reference script): gates i, g, f, o; the layer
    norm of x W and h R with gamma[0], gamma[1]; the output o * tanh(LN(c; gamma_h, beta_h))."""
    F = torch.nn.functional
    H = s["recurrent_kernel"].shape[0]
    h = c = torch.zeros(x.shape[1], H, dtype=x.dtype)
    outputs = []
    for t in range(x.shape[0]):
        v = (F.layer_norm(x[t] @ s["kernel"], (4 * H,), weight=s["gamma"][0])
             + F.layer_norm(h @ s["recurrent_kernel"], (4 * H,), weight=s["gamma"][1]) + s["bias"])
        i, g, f, o = v.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(F.layer_norm(c, (H,), weight=s["gamma_h"], bias=s["beta_h"]))
        outputs.append(h)
    return torch.stack(outputs)


def haste_gru(x, s):
    """Haste's LayerNormGRU equations: gates z, r, h; n = tanh(vx_h + r * vh_h); h = z h + (1 - z) n."""
    F = torch.nn.functional
    H = s["recurrent_kernel"].shape[0]
    h = torch.zeros(x.shape[1], H, dtype=x.dtype)
    outputs = []
    for t in range(x.shape[0]):
        vx = (F.layer_norm(x[t] @ s["kernel"], (3 * H,), weight=s["gamma"][0]) + s["bias"]).chunk(3, 1)
        vh = (F.layer_norm(h @ s["recurrent_kernel"], (3 * H,), weight=s["gamma"][1])
              + s["recurrent_bias"]).chunk(3, 1)
        z, r = torch.sigmoid(vx[0] + vh[0]), torch.sigmoid(vx[1] + vh[1])
        h = z * h + (1 - z) * torch.tanh(vx[2] + r * vh[2])
        outputs.append(h)
    return torch.stack(outputs)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_haste_state_dicts_load_both_ways_and_give_hastes_outputs(cell):
    torch.manual_seed(3)
    I, H, G = 3, 5, 4 if cell == "lstm" else 3
    s = {"kernel": torch.randn(I, G * H, dtype=torch.float64) * 0.4,
         "recurrent_kernel": torch.randn(H, G * H, dtype=torch.float64) * 0.4,
         "bias": torch.randn(G * H, dtype=torch.float64) * 0.3,
         "gamma": 1 + torch.randn(2, G * H, dtype=torch.float64) * 0.2}
    if cell == "lstm":
        s.update(gamma_h=1 + torch.randn(H, dtype=torch.float64) * 0.2,
                 beta_h=torch.randn(H, dtype=torch.float64))
    else:
        s["recurrent_bias"] = torch.randn(G * H, dtype=torch.float64) * 0.3
    module = getattr(ct, cell.upper())(I, H, layer_norm=True).double()
    module.load_state_dict(haste.from_haste(s, cell))
    x = torch.randn(7, 2, I, dtype=torch.float64)
    expected = (haste_lstm if cell == "lstm" else haste_gru)(x, s)
    torch.testing.assert_close(module(x)[0], expected, rtol=1e-12, atol=1e-12)
    back = haste.to_haste(module.state_dict(), cell)
    assert set(back) == set(s)
    for name, value in s.items():
        torch.testing.assert_close(back[name], value, rtol=0, atol=1e-15)
    layer = getattr(conveyor, cell.upper())(I, H, layer_norm=True, dtype=np.float64)  # NumPy arrays too
    layer.load_state_dict(haste.from_haste({k: v.numpy() for k, v in s.items()}, cell))
    np.testing.assert_allclose(layer.forward(x.numpy())[0], expected.numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"state: missing \['recurrent_kernel'"):
        haste.from_haste({"kernel": s["kernel"], "bias": s["bias"]}, cell)


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
