"""The projected LSTM (LSTMP, proj_size) on the CPU backend beyond the option grid of test_variants.py:
Conveyor's own gradients against finite differences (with options, lengths and recurrent dropout), an
identity projection equal to none, windows chained through (h_T, c_T), stacks and layers against the float64
reference and against torch.nn.LSTM(proj_size), TBPTT, and the refusals."""

import numpy as np
import pytest

import conveyor

import reference as ref
from support import assert_close


def projected(T, B, I, H, P, rng, *, gates=4, peephole=False):
    """A window's float64 inputs and upstream gradients with a projection of H units to P."""
    w = 1.0 / np.sqrt(H)

    def u(*shape, s=1.0):
        return rng.uniform(-s, s, size=shape)

    return dict(x=u(T, B, I), W=u(gates * H, I, s=w), R=u(gates * H, P, s=w), bW=u(gates * H, s=w),
                bR=u(gates * H, s=w), h0=u(B, P, s=0.5), c0=u(B, H, s=0.5), W_hr=u(P, H, s=0.7),
                P=u(3, H, s=0.5) if peephole else None,
                dy=u(T, B, P), dh_T=u(B, P), dc_T=u(B, H))


def forward(a, **options):
    return conveyor.lstm_forward(a["x"], a["W"], a["R"], a["bW"], a["bR"], a["h0"], a["c0"], P=a["P"],
                                 W_hr=a["W_hr"], **options)


def loss(a, outputs):
    y, h_T, c_T, _ = outputs
    return float(np.sum(y * a["dy"]) + np.sum(h_T * a["dh_T"]) + np.sum(c_T * a["dc_T"]))


OPTIONS = {
    "plain": {},
    "peephole-clip-forget_bias": dict(cell_clip=0.6, forget_bias=1.0),
    "coupled-relu": dict(coupled_gates=True, activation="relu"),
    "lengths": dict(lengths=[3, 1, 2]),
}
DROPOUT = dict(recurrent_dropout=0.3, variational=False, seed=5, mask_stream=2)


def assert_matches_finite_differences(a, grads, names, **options):
    """Each gradient named (grad, input) against central differences of the loss of Conveyor's forward with
    `options` (the same seed, hence the same dropout masks, in every call)."""
    eps = 1e-6
    for grad_name, input_name in names:
        array = a[input_name]
        if array is None:
            assert getattr(grads, grad_name) is None, grad_name
            continue
        numeric = np.empty_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + eps
            plus = loss(a, forward(a, **options))
            array[index] = saved - eps
            minus = loss(a, forward(a, **options))
            array[index] = saved
            numeric[index] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(getattr(grads, grad_name), numeric, rtol=1e-5, atol=1e-7,
                                   err_msg=grad_name)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_gradients_match_finite_differences(name, rng):
    """Conveyor's own float64 gradients, dW_hr included, against central differences of its forward."""
    options = OPTIONS[name]
    a = projected(3, 3, 3, 5, 2, rng, gates=3 if options.get("coupled_gates") else 4,
                  peephole=name.startswith("peephole"))
    grads = conveyor.lstm_backward(forward(a, **options)[-1], a["dy"], a["dh_T"], a["dc_T"])
    names = [("dx", "x"), ("dh0", "h0"), ("dc0", "c0"), ("dW", "W"), ("dR", "R"), ("dbW", "bW"),
             ("dbR", "bR"), ("dP", "P"), ("dW_hr", "W_hr")]
    assert_matches_finite_differences(a, grads, names, training=False, **options)


def test_gradients_with_recurrent_dropout_match_finite_differences(rng):
    """With recurrent dropout the masked forward is differenced in training mode (same seed, same masks)."""
    a = projected(4, 2, 3, 5, 3, rng)
    grads = conveyor.lstm_backward(forward(a, **DROPOUT)[-1], a["dy"], a["dh_T"], a["dc_T"])
    names = [("dR", "R"), ("dW_hr", "W_hr"), ("dh0", "h0"), ("dx", "x")]
    assert_matches_finite_differences(a, grads, names, **DROPOUT)


def test_an_identity_projection_is_no_projection(rng):
    """W_hr = I (P = H) gives the unprojected LSTM's outputs and gradients, and dW_hr = sum (dy + dh) m^T."""
    a = projected(5, 3, 4, 6, 6, rng)
    a["W_hr"] = np.eye(6)
    with_identity = forward(a)
    plain = conveyor.lstm_forward(a["x"], a["W"], a["R"], a["bW"], a["bR"], a["h0"], a["c0"])
    for got, expected in zip(with_identity[:3], plain[:3]):
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-14)
    g1 = conveyor.lstm_backward(with_identity[-1], a["dy"], a["dh_T"], a["dc_T"])
    g2 = conveyor.lstm_backward(plain[-1], a["dy"], a["dh_T"], a["dc_T"])
    for name in ("dx", "dh0", "dc0", "dW", "dR", "dbW", "dbR"):
        np.testing.assert_allclose(getattr(g1, name), getattr(g2, name), rtol=1e-12, atol=1e-13, err_msg=name)
    assert g2.dW_hr is None and g1.dW_hr.shape == (6, 6)


def test_windows_chain_exactly(rng):
    a = projected(8, 2, 3, 5, 2, rng)
    y, h_T, c_T, _ = forward(a, training=False)
    first = forward({**a, "x": a["x"][:3]}, training=False)
    rest = {**a, "x": np.ascontiguousarray(a["x"][3:]), "h0": first[1], "c0": first[2]}
    second = forward(rest, training=False)
    np.testing.assert_array_equal(np.concatenate([first[0], second[0]]), y)
    np.testing.assert_array_equal(second[1], h_T)
    np.testing.assert_array_equal(second[2], c_T)


def test_float32_matches_the_reference(rng):
    a = projected(7, 4, 6, 9, 4, rng, peephole=True)
    a32 = {k: None if v is None else v.astype(np.float32) for k, v in a.items()}
    y, h_T, c_T, saved = forward(a32)
    g = conveyor.lstm_backward(saved, a32["dy"], a32["dh_T"], a32["dc_T"])
    ry, rh, rc, cache = ref.lstm_forward(a["x"], a["W"], a["R"], a["bW"], a["bR"], a["h0"], a["c0"],
                                         peephole=a["P"], projection=a["W_hr"])
    rg = ref.lstm_backward(cache, a["dy"], a["dh_T"], a["dc_T"])
    for name, got, expected in zip(("y", "h_T", "c_T"), (y, h_T, c_T), (ry, rh, rc)):
        assert_close(name, got, expected, np.float32)
    for name, got, expected in zip(g._fields[:9], g, rg):  # all but dlayer_norm
        assert_close(name, got, expected, np.float32)


def layer_reference(layer, x, h0, c0, dy, dh_n, dc_n):
    """A layer's stack run window by window through the float64 reference: (y, h_n, c_n, grads by name)."""
    p, D, S = layer.params, layer.directions, layer.state_size
    layer_input, h_n, c_n, caches = x, [], [], []
    for layer_index in range(layer.num_layers):
        outputs = []
        for d in range(D):
            k = layer_index * D + d
            name = f"l{layer_index}" + ("_reverse" if d else "")
            inp = layer_input if d == 0 else layer_input[::-1]
            y, h, c, cache = ref.lstm_forward(
                inp, p[f"weight_ih_{name}"], p[f"weight_hh_{name}"], p[f"bias_ih_{name}"],
                p[f"bias_hh_{name}"], h0[k], c0[k], projection=p[f"weight_hr_{name}"])
            outputs.append(y if d == 0 else y[::-1])
            h_n.append(h)
            c_n.append(c)
            caches.append((name, cache))
        layer_input = np.concatenate(outputs, axis=-1)
    grads, d_output = {}, dy
    for layer_index in reversed(range(layer.num_layers)):
        d_input = 0
        for d in range(D):
            k = layer_index * D + d
            name, cache = caches[k]
            part = d_output[..., d * S:(d + 1) * S]
            g = ref.lstm_backward(cache, part if d == 0 else part[::-1], dh_n[k], dc_n[k])
            d_input = d_input + (g[0] if d == 0 else g[0][::-1])
            for key, value in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), g[3:7]):
                grads[f"{key}_{name}"] = value
            grads[f"weight_hr_{name}"] = g[8]
        d_output = d_input
    return layer_input, np.stack(h_n), np.stack(c_n), grads, d_output


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-way", "bidirectional"])
def test_layer_matches_the_reference(layers, bidirectional, rng):
    layer = conveyor.LSTM(3, 6, num_layers=layers, bidirectional=bidirectional, proj_size=2, dtype=np.float64,
                          seed=1)
    D = layer.directions
    assert layer.params["weight_hh_l0"].shape == (24, 2)
    assert layer.params["weight_hr_l0"].shape == (2, 6)
    if layers == 2:
        assert layer.params["weight_ih_l1"].shape == (24, 2 * D)
    x = rng.uniform(-1, 1, (5, 4, 3))
    h0, c0 = rng.uniform(-0.5, 0.5, (layers * D, 4, 2)), rng.uniform(-0.5, 0.5, (layers * D, 4, 6))
    dy = rng.uniform(-1, 1, (5, 4, 2 * D))
    dh_n, dc_n = rng.uniform(-1, 1, h0.shape), rng.uniform(-1, 1, c0.shape)
    y, h_n, c_n = layer.forward(x, h0, c0)
    dx, dh0, dc0 = layer.backward(dy, dh_n, dc_n)
    ry, rh, rc, rgrads, rdx = layer_reference(layer, x, h0, c0, dy, dh_n, dc_n)
    for name, got, expected in (("y", y, ry), ("h_n", h_n, rh), ("c_n", c_n, rc), ("dx", dx, rdx)):
        assert_close(name, got, expected, np.float64)
    assert set(layer.grads) == set(rgrads) == set(layer.params)
    for name, expected in rgrads.items():
        assert_close(name, layer.grads[name], expected, np.float64)
    assert dh0.shape == h0.shape and dc0.shape == c0.shape


def test_layer_loads_torchs_state_dict_and_gives_its_outputs():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.LSTM(4, 7, num_layers=2, bidirectional=True, proj_size=3).double()
    layer = conveyor.LSTM(4, 7, num_layers=2, bidirectional=True, proj_size=3, dtype=np.float64)
    assert list(layer.state_dict()) == list(module.state_dict())
    layer.load_state_dict(module.state_dict())
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    expected, (h_n, c_n) = module(x)
    y, h, c = layer.forward(x.numpy())
    np.testing.assert_allclose(y, expected.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(h, h_n.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(c, c_n.detach().numpy(), rtol=1e-12, atol=1e-13)
    assert "proj_size=3" in repr(layer)


def test_tbptt_windows_equal_one_call(rng):
    layer = conveyor.LSTM(3, 5, num_layers=2, proj_size=2, dtype=np.float64, seed=3)
    x = rng.uniform(-1, 1, (12, 2, 3))
    whole, h_n, c_n = layer.eval().forward(x)
    driver = conveyor.TBPTT(layer.train(), 4)
    parts = []
    for t in range(0, 12, 4):
        parts.append(driver.forward(x[t:t + 4]))
        driver.backward(np.ones_like(parts[-1]))
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-13, atol=1e-14)
    assert layer.grads["weight_hr_l1"].shape == (2, 5) and np.all(np.isfinite(layer.grads["weight_hr_l1"]))


def test_refusals_name_the_argument(rng):
    a = projected(3, 2, 3, 5, 2, rng)
    with pytest.raises(ValueError, match=r"W_hr: a projection is an LSTM option, but the cell is gru"):
        conveyor._conveyor.forward("gru", {}, a["x"], rng.uniform(size=(15, 3)), rng.uniform(size=(15, 2)),
                                   None, None, None, None, None, a["W_hr"], None, None, False, True)
    with pytest.raises(ValueError, match=r"R: expected shape \(20, 2\) = \(4\*hidden_size, proj_size\)"):
        forward({**a, "R": rng.uniform(size=(20, 5))})
    with pytest.raises(ValueError, match=r"h0: expected shape \(2, 2\) \[B, proj_size\], got \(2, 5\)"):
        forward({**a, "h0": rng.uniform(size=(2, 5))})
    with pytest.raises(ValueError, match=r"c0: expected shape \(2, 5\) \[B, hidden_size\], got \(2, 2\)"):
        forward({**a, "c0": rng.uniform(size=(2, 2))})
    with pytest.raises(ValueError, match=r"W_hr: expected a 2-D array \(proj_size, hidden_size\)"):
        forward({**a, "W_hr": rng.uniform(size=(2, 5, 1))})
    with pytest.raises(TypeError, match=r"W_hr: expected dtype float64"):
        forward({**a, "W_hr": a["W_hr"].astype(np.float32)})
    saved = forward(a)[-1]
    with pytest.raises(ValueError, match=r"dy: expected shape \(3, 2, 2\) \[T, B, proj_size\]"):
        conveyor.lstm_backward(saved, rng.uniform(size=(3, 2, 5)))
    with pytest.raises(ValueError, match=r"proj_size: expected 0 \(no projection\) or an integer from 1 to "
                                         r"hidden_size - 1 = 4, got 5"):
        conveyor.LSTM(3, 5, proj_size=5)
