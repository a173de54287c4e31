"""Conveyor against torch.nn.LSTM/GRU/RNN on the same weights: outputs and every gradient (torch's autograd),
and torch state dicts loading into the layer objects unchanged. CI installs the CPU build of torch."""

import numpy as np
import pytest

import conveyor

from support import assert_close, make_problem, run_conveyor

torch = pytest.importorskip("torch")

# The cells torch has: GRU only with reset_after=True, LSTM and GRU only with tanh.
TORCH_CONFIGS = [
    ("lstm", {"activation": "tanh"}, lambda I, H: torch.nn.LSTM(I, H)),
    ("gru", {"reset_after": True, "activation": "tanh"}, lambda I, H: torch.nn.GRU(I, H)),
    ("rnn", {"activation": "tanh"}, lambda I, H: torch.nn.RNN(I, H, nonlinearity="tanh")),
    ("rnn", {"activation": "relu"}, lambda I, H: torch.nn.RNN(I, H, nonlinearity="relu")),
]


def _torch_run(module, p, dtype):
    module = module.to(getattr(torch, np.dtype(dtype).name))
    with torch.no_grad():
        module.weight_ih_l0.copy_(torch.from_numpy(p.W))
        module.weight_hh_l0.copy_(torch.from_numpy(p.R))
        module.bias_ih_l0.copy_(torch.from_numpy(p.bW))
        module.bias_hh_l0.copy_(torch.from_numpy(p.bR))
    x = torch.from_numpy(p.x).requires_grad_(True)
    h0 = torch.from_numpy(p.h0[None]).requires_grad_(True)
    if p.cell == "lstm":
        c0 = torch.from_numpy(p.c0[None]).requires_grad_(True)
        y, (h_T, c_T) = module(x, (h0, c0))
        loss = (y * torch.from_numpy(p.dy)).sum() + (h_T[0] * torch.from_numpy(p.dh_T)).sum() \
            + (c_T[0] * torch.from_numpy(p.dc_T)).sum()
    else:
        y, h_T = module(x, h0)
        loss = (y * torch.from_numpy(p.dy)).sum() + (h_T[0] * torch.from_numpy(p.dh_T)).sum()
    loss.backward()
    grads = {"dx": x.grad, "dh0": h0.grad[0], "dW": module.weight_ih_l0.grad, "dR": module.weight_hh_l0.grad,
             "dbW": module.bias_ih_l0.grad, "dbR": module.bias_hh_l0.grad}
    if p.cell == "lstm":
        grads["dc0"] = c0.grad[0]
    return y.detach().numpy(), {k: v.numpy() for k, v in grads.items()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("cell", "options", "make"), TORCH_CONFIGS,
                         ids=["lstm", "gru", "rnn-tanh", "rnn-relu"])
def test_matches_torch(cell, options, make, dtype, rng):
    torch.manual_seed(0)
    p = make_problem(cell, options, 6, 4, 10, 12, rng).cast(dtype)
    y, _, _, grads = run_conveyor(p)
    ty, tgrads = _torch_run(make(10, 12), p, dtype)
    assert_close("y", y, ty.astype(np.float64), dtype)
    for name, expected in tgrads.items():
        assert_close(name, grads[name], expected.astype(np.float64), dtype)


@pytest.mark.parametrize(("layer_cls", "torch_cls"), [(conveyor.LSTM, "LSTM"), (conveyor.GRU, "GRU"),
                                                      (conveyor.RNN, "RNN")])
def test_torch_state_dict_loads_unchanged(layer_cls, torch_cls, rng):
    torch.manual_seed(1)
    module = getattr(torch.nn, torch_cls)(5, 7)
    layer = layer_cls(5, 7)
    layer.load_state_dict(module.state_dict())
    x = rng.standard_normal((3, 2, 5)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    assert_close("y", layer(x)[0], expected.astype(np.float64), np.float32)
