"""The CPU backend's steps split over threads by groups of units (csrc/cpu/recurrence.cpp, UnitGroups): on
more than one thread, each task of a step multiplies the previous state by its units' columns of R and runs
the cell on those units, forward and backward. At a size where the units fall into several groups, some
smaller than the others, every cell and option gives the same bits as on one thread (one group) and matches
the float64 reference."""

import numpy as np
import pytest
from test_lengths import (
    assert_matches,
    poison_padding,
    random_lengths,
    reference_with_lengths,
    run_with_lengths,
)
from test_variants import LSTM_OPTIONS, lstm_id, lstm_problem, reference_lstm, run_lstm

import conveyor

import reference as ref
from support import (
    CONFIGS,
    assert_all_close,
    assert_close,
    config_id,
    make_problem,
    run_conveyor,
    run_reference,
)

# B * H * G * H multiply-adds a step make several tasks; H = 176 is a whole number of 64-byte lines (so
# the rows split by units) but not of the groups, so the last group is narrower than the others.
# On 2 threads every cell's groups are uneven (the LSTM's: 5 of 32 units and one of 16); on 3 the LSTM's are
# 11 of 16.
T, B, I, H = 4, 24, 20, 176
THREADS = [2, 3]


def on_threads(threads, fn):
    saved = conveyor.num_threads()
    try:
        conveyor.set_num_threads(threads)
        return fn()
    finally:
        conveyor.set_num_threads(saved)


def assert_same_bits(got, expected):
    if isinstance(got, dict):
        assert set(got) == set(expected)
        for name in got:
            assert_same_bits(got[name], expected[name])
    elif isinstance(got, (tuple, list)):
        for a, b in zip(got, expected):
            assert_same_bits(a, b)
    elif got is None:
        assert expected is None
    else:
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_every_cell_gives_one_threads_bits_and_the_reference(config, threads, rng):
    p = make_problem(*config, T, B, I, H, rng)
    for dtype in (np.float32, np.float64):
        q = p.cast(dtype)
        split = on_threads(threads, lambda q=q: run_conveyor(q))
        assert_same_bits(split, on_threads(1, lambda q=q: run_conveyor(q)))
    y, h_T, c_T, grads = split
    ry, rh_T, rc_T, rgrads = run_reference(p)
    assert_close("y", y, ry, np.float64)
    assert_close("h_T", h_T, rh_T, np.float64)
    if p.cell == "lstm":
        assert_close("c_T", c_T, rc_T, np.float64)
    for name, expected in rgrads.items():
        assert_close(name, grads[name], expected, np.float64)


# Peepholes, coupled gates, the forget bias, the clip and the projection (which keeps the product and the
# cell apart) each at least once.
SOME_LSTM_OPTIONS = [o for o in LSTM_OPTIONS if o["activation"] == "tanh"][::3]


@pytest.mark.parametrize("o", SOME_LSTM_OPTIONS, ids=lstm_id)
def test_lstm_options_give_one_threads_bits_and_the_reference(o, rng):
    p = lstm_problem(o, T, B, I, H, rng)
    split = on_threads(2, lambda: run_lstm(p, o, np.float64))
    assert_same_bits(split, on_threads(1, lambda: run_lstm(p, o, np.float64)))
    expected, _ = reference_lstm(p, o)
    assert_all_close(split, expected, np.float64)


@pytest.mark.parametrize("variational", [True, False], ids=["variational", "per-step"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_recurrent_dropout_gives_one_threads_bits_and_the_reference(config, variational, rng):
    cell, options = config
    p = make_problem(cell, options, T, B, I, H, rng)
    dropout = dict(recurrent_dropout=0.3, variational=variational, seed=5, mask_stream=2)
    q = p.cast(np.float64)
    q.options = {**options, **dropout}
    split = on_threads(2, lambda: run_conveyor(q))
    assert_same_bits(split, on_threads(1, lambda: run_conveyor(q)))
    mask = ref.dropout_mask(0.3, variational, 5, 2, (T, B, H))
    h0, dh_T = p.h0, p.dh_T
    if cell == "lstm":
        ry, rh_T, _, cache = ref.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, h0, p.c0, options["activation"],
                                              recurrent_mask=mask)
        rgrads = ref.lstm_backward(cache, p.dy, dh_T, p.dc_T)[:7]
        names = ("dx", "dh0", "dc0", "dW", "dR", "dbW", "dbR")
    else:
        ry, rh_T, cache = getattr(ref, f"{cell}_forward")(p.x, p.W, p.R, p.bW, p.bR, h0, **options,
                                                          recurrent_mask=mask)
        rgrads = getattr(ref, f"{cell}_backward")(cache, p.dy, dh_T)
        names = ("dx", "dh0", "dW", "dR", "dbW", "dbR")
    assert_close("y", split[0], ry, np.float64)
    assert_close("h_T", split[1], rh_T, np.float64)
    for name, expected in zip(names, rgrads):
        assert_close(name, split[3][name], expected, np.float64)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_variable_lengths_give_one_threads_bits_and_the_reference(config, rng):
    """Rows stop at different steps, so a step's product and cell cover fewer rows than the step after's."""
    p = make_problem(*config, T, B, I, H, rng)
    lengths = random_lengths(rng, T, B)
    p.dy = poison_padding(p.dy, lengths)
    split = on_threads(2, lambda: run_with_lengths(p, lengths))
    assert_same_bits(split, on_threads(1, lambda: run_with_lengths(p, lengths)))
    assert_matches(split, reference_with_lengths(p, lengths), np.float64, lengths)
