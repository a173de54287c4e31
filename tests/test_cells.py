"""Every cell and option of the CPU backend against the float64 reference: outputs and every gradient, at
shapes that exercise the edges (T=1, B=1, H not a multiple of 8, I != H, sizes that cross the GEMM's
blocking), in float64 and float32; plus finite differences on Conveyor itself, exact window splitting,
determinism across thread counts, and inference mode."""

import numpy as np
import pytest

import conveyor

from support import CONFIGS, assert_close, config_id, make_problem, run_conveyor, run_reference

SHAPES = [  # (T, B, I, H)
    (1, 1, 3, 5),
    (4, 3, 5, 7),
    (7, 2, 9, 13),
    (5, 17, 40, 70),  # T*B = 85 rows, B > 2: the packed GEMM path; 4H = 280 columns cross a tile
    (3, 8, 300, 33),  # I > 256 crosses the K blocking of the input projection
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_reference(config, shape, dtype, rng):
    p = make_problem(*config, *shape, rng)
    y, h_T, c_T, grads = run_conveyor(p.cast(dtype))
    ry, rh_T, rc_T, rgrads = run_reference(p)
    assert_close("y", y, ry, dtype)
    assert_close("h_T", h_T, rh_T, dtype)
    if p.cell == "lstm":
        assert_close("c_T", c_T, rc_T, dtype)
    assert set(grads) == set(rgrads)
    for name, expected in rgrads.items():
        assert_close(name, grads[name], expected, dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("variant", ["no-initial-state", "no-bias", "no-final-grads", "none-of-them"])
def test_optional_arguments(config, variant, rng):
    """Absent h0/c0 mean zeros, absent biases mean none (and no bias gradients), absent dh_T/dc_T mean no loss
    on the final state."""
    p = make_problem(*config, 4, 3, 5, 6, rng,
                     initial_state=variant not in ("no-initial-state", "none-of-them"),
                     bias=variant not in ("no-bias", "none-of-them"),
                     final_grads=variant not in ("no-final-grads", "none-of-them"))
    y, h_T, c_T, grads = run_conveyor(p)
    ry, rh_T, _, rgrads = run_reference(p)
    assert_close("y", y, ry, np.float64)
    for name, expected in rgrads.items():
        if expected is None:
            assert grads[name] is None, f"{name}: expected None without a bias"
        else:
            assert_close(name, grads[name], expected, np.float64)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_long_window(config, rng):
    p = make_problem(*config, 200, 2, 3, 9, rng)
    y, h_T, _, grads = run_conveyor(p)
    ry, rh_T, _, rgrads = run_reference(p)
    assert_close("y", y, ry, np.float64)
    for name, expected in rgrads.items():
        assert_close(name, grads[name], expected, np.float64)


def _loss(p, forward_outputs):
    y, h_T, c_T = forward_outputs
    loss = np.sum(y * p.dy) + np.sum(h_T * p.dh_T)
    return loss + (np.sum(c_T * p.dc_T) if p.cell == "lstm" else 0.0)


def _forward_only(p):
    if p.cell == "lstm":
        y, h_T, c_T, _ = conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0, training=False,
                                               **p.options)
        return y, h_T, c_T
    y, h_T, _ = getattr(conveyor, f"{p.cell}_forward")(p.x, p.W, p.R, p.bW, p.bR, p.h0, training=False,
                                                       **p.options)
    return y, h_T, None


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_gradients_match_finite_differences(config, rng):
    """Conveyor's own float64 gradients against central differences of Conveyor's forward."""
    p = make_problem(*config, 3, 2, 3, 4, rng)
    if config[1].get("activation") == "relu":
        # Keep every relu argument away from its kink so that the differences are valid.
        p.x += np.sign(p.x) * 0.3
    _, _, _, grads = run_conveyor(p)
    inputs = {"dx": "x", "dh0": "h0", "dc0": "c0", "dW": "W", "dR": "R", "dbW": "bW", "dbR": "bR"}
    eps = 1e-6
    for grad_name, input_name in inputs.items():
        if grad_name not in grads:
            continue
        array = getattr(p, input_name)
        numeric = np.empty_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + eps
            plus = _loss(p, _forward_only(p))
            array[index] = saved - eps
            minus = _loss(p, _forward_only(p))
            array[index] = saved
            numeric[index] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(grads[grad_name], numeric, rtol=1e-5, atol=1e-7, err_msg=grad_name)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_windows_chain_exactly(config, batch, rng):
    """docs/math.md: a sequence cut into windows gives exactly the forward outputs of one call over all of
    it."""
    p = make_problem(*config, 11, batch, 300, 6, rng).cast(np.float32)
    whole = _forward_only(p)
    pieces, h, c = [], p.h0, p.c0
    for start, stop in [(0, 1), (1, 5), (5, 11)]:
        q = p.cast(np.float32)
        q.x, q.h0, q.c0 = np.ascontiguousarray(p.x[start:stop]), h, c
        y, h, c = _forward_only(q)
        pieces.append(y)
    np.testing.assert_array_equal(np.concatenate(pieces), whole[0])
    np.testing.assert_array_equal(h, whole[1])
    if p.cell == "lstm":
        np.testing.assert_array_equal(c, whole[2])


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_same_bits_on_any_number_of_threads(config, rng):
    p = make_problem(*config, 6, 7, 50, 40, rng).cast(np.float32)
    threads = conveyor.num_threads()
    try:
        conveyor.set_num_threads(1)
        one = run_conveyor(p)
        conveyor.set_num_threads(3)
        three = run_conveyor(p)
    finally:
        conveyor.set_num_threads(threads)
    for a, b in zip(one[:3], three[:3]):
        np.testing.assert_array_equal(a, b)
    for name in one[3]:
        np.testing.assert_array_equal(one[3][name], three[3][name], err_msg=name)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_inference_mode_saves_nothing_and_gives_the_same_outputs(config, rng):
    p = make_problem(*config, 5, 3, 4, 6, rng)
    training = run_conveyor(p)
    y, h_T, c_T = _forward_only(p)
    np.testing.assert_array_equal(y, training[0])
    np.testing.assert_array_equal(h_T, training[1])
    np.testing.assert_array_equal(h_T, y[-1])
    if p.cell == "lstm":
        np.testing.assert_array_equal(c_T, training[2])
