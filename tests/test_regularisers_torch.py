"""The regularisers through ``conveyor.torch`` (parameter names, outputs equal to the layers', gradcheck of
every layer-norm gain, torch.compile without a graph break) and Haste's state dicts both ways (the outputs of
Haste's equations, written here with PyTorch)."""

import numpy as np
import pytest

import conveyor
from conveyor import haste

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
