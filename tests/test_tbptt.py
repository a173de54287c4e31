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


def _documents(rng, steps, batch):
    """A reset mask [steps, B]: about one step in six starts a new document, row 0 also at step 0."""
    reset = rng.random((steps, batch)) < 1 / 6
    reset[0, 0] = True
    return reset


def _pieces(reset, b, start, end):
    """Row b's pieces of steps start .. end - 1, cut where it resets: [(first, last, from_zeros)]."""
    cuts = [t for t in range(start + 1, end) if reset[t, b]]
    bounds = [start] + cuts + [end]
    return [(first, last, first in cuts or reset[first, b]) for first, last in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_reset_runs_each_document_from_zeros(cell, rng):
    """With reset, each row's outputs are those of its documents run one by one from zero states."""
    layer, x = make(cell, rng)
    reset = _documents(rng, len(x), 4)
    for training in (False, True):
        layer.train(training)
        tb = conveyor.TBPTT(layer, 5)
        y = np.concatenate([tb.forward(x[t:t + 5], reset=reset[t:t + 5]) for t in range(0, len(x), 5)])
        layer.eval()
        for b in range(4):
            starts = [0] + [t for t in range(1, len(x)) if reset[t, b]] + [len(x)]
            for first, last in zip(starts, starts[1:]):
                alone = layer(np.ascontiguousarray(x[first:last, b:b + 1]))[0]
                np.testing.assert_allclose(y[first:last, b:b + 1], alone, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reset_stops_the_gradient_at_a_document_boundary(cell, rng):
    """TBPTT(k, k) with resets: each row's dx and the parameter gradients are those of its pieces (cut at its
    resets) run as windows of their own, a piece that starts a document from zeros and the first piece of a
    window from the carried state, no gradient flowing across a boundary."""
    layer, x = make(cell, rng)
    x = np.ascontiguousarray(x[:18, :3])
    reset = _documents(rng, 18, 3)
    dys = rng.standard_normal((18, 3, 5))
    tb = conveyor.TBPTT(layer, 6)
    for t in range(0, 18, 6):
        h, c = tb.state
        tb.forward(x[t:t + 6], reset=reset[t:t + 6])
        dx = tb.backward(dys[t:t + 6])
        got = dict(layer.grads)
        expected = {name: 0 for name in got}
        for b in range(3):
            for first, last, from_zeros in _pieces(reset, b, t, t + 6):
                row = slice(b, b + 1)
                carried = h is not None and not from_zeros
                h0 = np.ascontiguousarray(h[:, row]) if carried else None
                c0 = np.ascontiguousarray(c[:, row]) if carried and c is not None else None
                piece_dx, grads = _window_grads(layer, np.ascontiguousarray(x[first:last, row]), h0, c0,
                                                np.ascontiguousarray(dys[first:last, row]))
                np.testing.assert_allclose(dx[first - t:last - t, row], piece_dx, rtol=1e-10, atol=1e-12)
                expected = {name: expected[name] + grads[name] for name in expected}
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_reset_with_k2_keeps_the_boundary_across_windows(rng):
    """TBPTT(2, 6): a backward reaching back over an older window's reset stops there for that row."""
    layer, x = make("lstm", rng, num_layers=1)
    x = np.ascontiguousarray(x[:6, :2])
    reset = np.zeros((6, 2), bool)
    reset[2, 0] = True  # row 0 starts a new document at step 2; row 1 runs on
    tb = conveyor.TBPTT(layer, 2, 6)
    for t in range(0, 6, 2):
        tb.forward(x[t:t + 2], reset=reset[t:t + 2])
        dy = np.zeros((2, 2, 5))
        dy[-1] = 1.0
        dx = tb.backward(dy)
    assert tb.span == 6
    assert not np.any(dx[:2, 0]), "the gradient crossed row 0's document boundary"
    assert np.all(np.abs(dx[:2, 1]) > 0), "row 1 has no boundary: its gradient reaches the oldest steps"


def test_bad_reset(rng):
    layer, x = make("gru", rng)
    tb = conveyor.TBPTT(layer, 5)
    with pytest.raises(ValueError, match=r"reset: expected shape \(5, 4\) = \(steps of x, B\), got \(5, 3\)"):
        tb.forward(x[:5], reset=np.zeros((5, 3), bool))
    with pytest.raises(TypeError, match="reset: expected an array of booleans"):
        tb.forward(x[:5], reset=np.zeros((5, 4)))
