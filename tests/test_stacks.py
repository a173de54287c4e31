"""Stacks and directions, dropout between layers, layer objects with every option, and gradient clipping.

Stacked and bidirectional models are compared with torch.nn.LSTM/GRU/RNN on the same weights (outputs, final
states and every gradient by torch's autograd, float64); dropout between layers with a composition of
single windows and the masks of conveyor.dropout_mask, and by finite differences given the masks."""

import numpy as np
import pytest

import conveyor
from conveyor import _stack
from conveyor._stack import OUTPUT_DROPOUT, mask_stream

try:
    import torch
except ImportError:  # only the tests marked needs_torch use it; the others run without it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (pip install torch)")

TORCH = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
LAYERS = {"lstm": conveyor.LSTM, "gru": conveyor.GRU, "rnn": conveyor.RNN}


def torch_run(module, x, h0, c0, dy, dh_n, dc_n):
    xt = torch.from_numpy(x).requires_grad_(True)
    states = [torch.from_numpy(h0).requires_grad_(True)]
    if c0 is not None:
        states.append(torch.from_numpy(c0).requires_grad_(True))
    y, final = module(xt, tuple(states) if c0 is not None else states[0])
    finals = final if c0 is not None else (final,)
    loss = (y * torch.from_numpy(dy)).sum() + (finals[0] * torch.from_numpy(dh_n)).sum()
    if c0 is not None:
        loss = loss + (finals[1] * torch.from_numpy(dc_n)).sum()
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    return (y.detach().numpy(), [f.detach().numpy() for f in finals], xt.grad.numpy(),
            [s.grad.numpy() for s in states], grads)


@needs_torch
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-way", "bidirectional"])
@pytest.mark.parametrize("num_layers", [2, 3])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_stacks_match_torch_on_the_same_weights(cell, num_layers, bidirectional, rng):
    T, B, I, H = 5, 3, 4, 6
    D = 2 if bidirectional else 1
    torch.manual_seed(0)
    module = getattr(torch.nn, TORCH[cell])(I, H, num_layers=num_layers, bidirectional=bidirectional).double()
    layer = LAYERS[cell](I, H, num_layers=num_layers, bidirectional=bidirectional, dtype=np.float64)
    layer.load_state_dict(module.state_dict())
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((num_layers * D, B, H))
    c0 = rng.standard_normal((num_layers * D, B, H)) if cell == "lstm" else None
    dy = rng.standard_normal((T, B, D * H))
    dh_n = rng.standard_normal((num_layers * D, B, H))
    dc_n = rng.standard_normal((num_layers * D, B, H)) if cell == "lstm" else None
    ty, tfinals, tdx, tdstates, tgrads = torch_run(module, x, h0, c0, dy, dh_n, dc_n)

    if cell == "lstm":
        y, h_n, c_n = layer(x, h0, c0)
        dx, dh0, dc0 = layer.backward(dy, dh_n, dc_n)
        np.testing.assert_allclose(c_n, tfinals[1], rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(dc0, tdstates[1], rtol=1e-9, atol=1e-11)
    else:
        y, h_n = layer(x, h0)
        dx, dh0 = layer.backward(dy, dh_n)
    np.testing.assert_allclose(y, ty, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(h_n, tfinals[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dx, tdx, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dh0, tdstates[0], rtol=1e-9, atol=1e-11)
    assert set(layer.grads) == set(tgrads)
    for name, expected in tgrads.items():
        np.testing.assert_allclose(layer.grads[name], expected, rtol=1e-9, atol=1e-11, err_msg=name)


@needs_torch
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_eval_mode_applies_no_dropout_and_matches_torch(cell, rng):
    torch.manual_seed(1)
    module = getattr(torch.nn, TORCH[cell])(3, 5, num_layers=2, bidirectional=True, dropout=0.5)
    module = module.double().eval()
    layer = LAYERS[cell](3, 5, num_layers=2, bidirectional=True, dropout=0.5, recurrent_dropout=0.3,
                         dtype=np.float64).eval()
    layer.load_state_dict(module.state_dict())
    x = rng.standard_normal((4, 2, 3))
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(layer(x)[0], expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("variational", [False, True], ids=["per-step", "variational"])
def test_dropout_between_layers_uses_the_documented_masks(variational, rng):
    """A 2-layer bidirectional stack with dropout equals single windows composed by hand with the masks of
    dropout_mask(seed, mask_stream(layer, direction, 0))."""
    T, B, I, H, p, seed = 6, 3, 4, 5, 0.4, 77
    layer = conveyor.LSTM(I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    weights = layer._weights()
    x = rng.standard_normal((T, B, I))
    y, _, _, _ = conveyor.stack_forward("lstm", x, weights, num_layers=2, bidirectional=True, dropout=p,
                                        variational=variational, seed=seed)

    def direction(inp, k, reverse):
        W, R, bW, bR, *_ = weights[k]
        out = conveyor.lstm_forward(np.ascontiguousarray(inp[::-1]) if reverse else inp, W, R, bW, bR,
                                    training=False)[0]
        return np.ascontiguousarray(out[::-1]) if reverse else out

    first = np.concatenate([direction(x, 0, False), direction(x, 1, True)], axis=-1)
    masks = [conveyor.dropout_mask(x, (T, B, H), p, variational=variational, seed=seed,
                                   mask_stream=mask_stream(0, d, OUTPUT_DROPOUT)) for d in (0, 1)]
    mask = np.concatenate(masks, axis=-1)
    assert 0 < np.count_nonzero(mask == 0) < mask.size
    if variational:
        assert all(np.array_equal(mask[t], mask[0]) for t in range(T))
    second_input = first * mask
    expected = np.concatenate([direction(second_input, 2, False), direction(second_input, 3, True)], axis=-1)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_stack_gradients_with_dropout_match_finite_differences(cell, rng):
    T, B, I, H, L = 4, 2, 3, 4, 2
    layer = LAYERS[cell](I, H, num_layers=L, bidirectional=True, dtype=np.float64, seed=1)
    weights = layer._weights()
    options = dict(num_layers=L, bidirectional=True, dropout=0.3, recurrent_dropout=0.3, variational=False,
                   seed=5)
    x = rng.standard_normal((T, B, I))
    dy = rng.standard_normal((T, B, 2 * H))

    def loss(x_, weights_):
        return float(np.sum(conveyor.stack_forward(cell, x_, weights_, **options)[0] * dy))

    _, _, _, saved = conveyor.stack_forward(cell, x, weights, **options)
    grads = conveyor.stack_backward(saved, dy)
    eps = 1e-6
    for index in [(0, 0, 0), (T - 1, B - 1, I - 1), (2, 1, 1)]:
        xp, xm = x.copy(), x.copy()
        xp[index] += eps
        xm[index] -= eps
        fd = (loss(xp, weights) - loss(xm, weights)) / (2 * eps)
        assert abs(grads.dx[index] - fd) <= 1e-7 + 1e-6 * abs(fd), ("dx", index, grads.dx[index], fd)
    for k in (0, 3):  # the first layer's forward and the second layer's reverse direction
        R = weights[k][1]
        for index in [(0, 0), (R.shape[0] - 1, H - 1)]:
            def perturbed(delta, k=k, index=index, R=R):
                w = [list(entry) for entry in weights]
                w[k][1] = R.copy()
                w[k][1][index] += delta
                return [tuple(entry) for entry in w]
            fd = (loss(x, perturbed(eps)) - loss(x, perturbed(-eps))) / (2 * eps)
            got = grads.weights[k].dR[index]
            assert abs(got - fd) <= 1e-7 + 1e-6 * abs(fd), ("dR", k, index, got, fd)


def test_layer_objects_take_every_option(rng):
    layer = conveyor.LSTM(4, 5, num_layers=2, bidirectional=True, dropout=0.2, variational=True,
                          recurrent_dropout=0.1, peephole=True, coupled_gates=True, forget_bias=1.0,
                          cell_clip=3.0, dtype=np.float64, seed=0)
    assert layer.params["weight_ih_l0"].shape == (15, 4)  # coupled gates: three blocks
    assert layer.params["weight_ih_l1_reverse"].shape == (15, 10)
    assert layer.params["weight_peephole_l1_reverse"].shape == (3, 5)
    x = rng.standard_normal((6, 2, 4))
    y, h_n, c_n = layer(x)
    assert y.shape == (6, 2, 10) and h_n.shape == c_n.shape == (4, 2, 5)
    dx, dh0, dc0 = layer.backward(rng.standard_normal(y.shape))
    assert dx.shape == x.shape and dh0.shape == (4, 2, 5)
    assert set(layer.grads) == set(layer.params)
    assert all(np.all(np.isfinite(g)) for g in layer.grads.values())
    # Training draws fresh masks each window; evaluation draws none.
    assert not np.array_equal(layer(x)[0], y)
    layer.eval()
    np.testing.assert_array_equal(layer(x)[0], layer(x)[0])
    text = repr(layer)
    for word in ("num_layers=2", "bidirectional=True", "peephole=True", "variational=True", "dropout=0.2",
                 "recurrent_dropout=0.1", "coupled_gates=True", "forget_bias=1.0", "cell_clip=3.0"):
        assert word in text, (word, text)


def test_bad_stack_arguments_raise(rng):
    layer = conveyor.GRU(3, 4, num_layers=2, dtype=np.float64)
    x = rng.standard_normal((5, 2, 3))
    with pytest.raises(ValueError, match=r"h0: expected shape \(2, 2, 4\)"):
        layer(x, rng.standard_normal((1, 2, 4)))
    with pytest.raises(ValueError, match="num_layers: expected an integer from 1"):
        conveyor.GRU(3, 4, num_layers=0)
    with pytest.raises(ValueError, match=r"dropout: expected a probability in \[0, 1\)"):
        conveyor.GRU(3, 4, dropout=1.0)
    with pytest.raises(ValueError, match="weights: expected 4 entries"):
        conveyor.stack_forward("gru", x, layer._weights()[:3], num_layers=2, bidirectional=True)
    with pytest.raises(TypeError, match="coupled_gates: not an option of a stack of gru layers"):
        conveyor.stack_forward("gru", x, layer._weights(), num_layers=2, coupled_gates=True)
    with pytest.raises(TypeError, match="seed: not an option"):
        _stack.StackPlan("gru", layer._weights(), num_layers=2, seed=3)  # a per-call argument of run
    y, _ = layer(x)
    with pytest.raises(ValueError, match=r"dy: expected shape \(5, 2, 4\)"):
        layer.backward(rng.standard_normal((5, 2, 8)))
    layer.backward(rng.standard_normal((5, 2, 4)))  # the rejected call left the forward pass in place


# ---------------------------------------------------------------------------------------------------------
# clip_grad_norm


def test_clip_grad_norm_scales_everything_by_one_factor(rng):
    grads = [rng.standard_normal((3, 4)), rng.standard_normal(5).astype(np.float32), None]
    before = [g.copy() for g in grads[:2]]
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in before))
    got = conveyor.clip_grad_norm(grads, 0.5)
    assert got == pytest.approx(norm, rel=1e-12)
    scale = 0.5 / (norm + 1e-6)
    np.testing.assert_allclose(grads[0], before[0] * scale, rtol=1e-12)
    np.testing.assert_allclose(grads[1], before[1] * np.float32(scale), rtol=1e-6)
    assert np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads[:2])) == pytest.approx(0.5, rel=1e-5)


def test_clip_grad_norm_leaves_small_gradients_and_reports_nan(rng):
    grads = {"a": rng.standard_normal(4) * 1e-3}
    before = grads["a"].copy()
    assert conveyor.clip_grad_norm(grads, 1.0) < 1.0
    np.testing.assert_array_equal(grads["a"], before)
    bad = [np.array([1.0, np.nan]), np.array([100.0])]
    assert np.isnan(conveyor.clip_grad_norm(bad, 1.0))
    np.testing.assert_array_equal(bad[1], [100.0])  # not scaled: the NaN is reported, not hidden
    assert conveyor.clip_grad_norm([np.array([np.inf])], 1.0) == np.inf


@needs_torch
def test_clip_grad_norm_on_torch_tensors_and_layer_grads(rng):
    t = torch.from_numpy(rng.standard_normal(10) * 10)
    norm = conveyor.clip_grad_norm([t], 1.0)
    assert norm > 1.0 and float(t.norm()) == pytest.approx(1.0, rel=1e-5)
    layer = conveyor.LSTM(3, 4, seed=0)
    y, _, _ = layer(rng.standard_normal((5, 2, 3)).astype(np.float32))
    layer.backward(np.full(y.shape, 100.0, np.float32))
    conveyor.clip_grad_norm(layer.grads, 0.25)
    total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in layer.grads.values()))
    assert total == pytest.approx(0.25, rel=1e-4)


@pytest.mark.parametrize("grads, max_norm, error, message", [
    ([np.ones(2)], 0.0, ValueError, "max_norm: expected a finite number > 0"),
    ([np.ones(2)], float("nan"), ValueError, "max_norm: expected a finite number > 0"),
    ([np.ones(2)], "1", TypeError, "max_norm: expected a number"),
    ([[1.0, 2.0]], 1.0, TypeError, r"grads\[0\]: expected a floating-point array, got list"),
    ([np.ones(2, np.int64)], 1.0, TypeError, r"grads\[0\]: expected a floating-point array"),
    (3, 1.0, TypeError, "grads: expected a mapping or an iterable of arrays"),
])
def test_clip_grad_norm_bad_arguments(grads, max_norm, error, message):
    with pytest.raises(error, match=message):
        conveyor.clip_grad_norm(grads, max_norm)
