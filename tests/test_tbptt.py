"""The TBPTT driver: windows of any length give exactly the outputs of one call over the whole sequence;
TBPTT(k, k) gives exactly the gradients of independent windows fed the carried states; TBPTT(k1, k2 > k1)
gives the gradients of a brute-force recomputation over the last k2 steps from the state k2 steps back."""

import numpy as np
import pytest

import conveyor

LAYERS = {"lstm": conveyor.LSTM, "gru": conveyor.GRU, "rnn": conveyor.RNN}


def make(cell, rng, num_layers=2, **options):
    layer = LAYERS[cell](3, 5, num_layers=num_layers, dtype=np.float64, seed=int(rng.integers(1000)),
                         **options)
    return layer, rng.standard_normal((23, 4, 3))


@pytest.mark.parametrize("k1", [1, 3, 5, 7, 23])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_windows_give_exactly_the_outputs_of_one_call(cell, k1, rng):
    layer, x = make(cell, rng)
    whole = layer.eval()(x)[0]
    for training in (False, True):
        layer.train(training)
        tb = conveyor.TBPTT(layer, k1)
        pieces = [tb.forward(x[t:t + k1]) for t in range(0, len(x), k1)]
        np.testing.assert_array_equal(np.concatenate(pieces), whole)


def _state_at(layer, x, steps):
    """(h, c) after `steps` steps of x from zeros, by one call (None, None for no steps)."""
    if steps == 0:
        return None, None
    out = layer(x[:steps])
    return out[1], out[2] if len(out) == 3 else None


def _window_grads(layer, x, h0, c0, dy):
    """One plain window's forward and backward: (dx, grads by name)."""
    out = layer(x, h0, c0) if isinstance(layer, conveyor.LSTM) else layer(x, h0)
    assert out[0].shape == dy.shape
    dx = layer.backward(dy)[0]
    return dx, dict(layer.grads)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_equal_k1_k2_gives_the_gradients_of_independent_windows(cell, rng):
    layer, x = make(cell, rng)
    k = 5
    dys = rng.standard_normal((len(x), 4, 5))
    tb = conveyor.TBPTT(layer, k)
    for t in range(0, len(x), k):
        h0, c0 = tb.state
        tb.forward(x[t:t + k])
        dx = tb.backward(dys[t:t + k])
        got = dict(layer.grads)
        expected_dx, expected = _window_grads(layer, x[t:t + k], h0, c0, dys[t:t + k])
        np.testing.assert_array_equal(dx, expected_dx)
        assert set(got) == set(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.parametrize(("k1", "k2"), [(2, 4), (3, 7), (4, 6), (1, 5), (5, 15)])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_longer_k2_matches_brute_force(cell, k1, k2, rng):
    layer, x = make(cell, rng)
    dys = rng.standard_normal((len(x), 4, 5))
    tb = conveyor.TBPTT(layer, k1, k2)
    for t in range(0, len(x), k1):
        n = min(k1, len(x) - t)
        tb.forward(x[t:t + n])
        dx = tb.backward(dys[t:t + n])
        got = dict(layer.grads)
        # Brute force: one window over the span from the state at its start, dy zero but on the newest steps.
        span = tb.span
        start = t + n - span
        assert min(k2, t + n) - tb.piece < span <= min(k2, t + n)
        h0, c0 = _state_at(layer, x, start)
        dy = np.zeros((span, 4, 5))
        dy[-n:] = dys[t:t + n]
        expected_dx, expected = _window_grads(layer, x[start:t + n], h0, c0, dy)
        np.testing.assert_allclose(dx, expected_dx, rtol=1e-10, atol=1e-12)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_span_reaches_back_k2_steps(rng):
    layer, x = make("rnn", rng, num_layers=1)
    tb = conveyor.TBPTT(layer, 3, 9)
    spans = []
    for t in range(0, 21, 3):
        tb.forward(x[t:t + 3])
        tb.backward(np.ones((3, 4, 5)))
        spans.append(tb.span)
    assert spans == [3, 6, 9, 9, 9, 9, 9]
    tb.reset()
    assert tb.span == 0 and tb.state == (None, None)


def test_bad_driver_arguments(rng):
    layer, x = make("gru", rng, num_layers=1)
    with pytest.raises(ValueError, match="k2: expected k2 >= k1 = 4"):
        conveyor.TBPTT(layer, 4, 3)
    with pytest.raises(ValueError, match="k1: expected a positive integer"):
        conveyor.TBPTT(layer, 0)
    with pytest.raises(ValueError, match="layer: a bidirectional layer"):
        conveyor.TBPTT(conveyor.GRU(3, 5, bidirectional=True), 4)
    tb = conveyor.TBPTT(layer, 4)
    with pytest.raises(ValueError, match="backward: no training forward"):
        tb.backward(np.ones((4, 4, 5)))
    with pytest.raises(ValueError, match="x: expected at most k1 = 4 steps, got 5"):
        tb.forward(x[:5])
    tb.forward(x[:4])
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 4, 5\)"):
        tb.backward(np.ones((3, 4, 5)))
    tb.backward(np.ones((4, 4, 5)))  # the rejected call left the forward in place
