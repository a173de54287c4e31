"""Several Python threads calling forward and backward at once (the compiled core releases the GIL) give
exactly the results of the same calls made one after another."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import conveyor

from support import CONFIGS, config_id, make_problem, run_conveyor


@pytest.mark.parametrize("config", CONFIGS[::2], ids=config_id)
def test_concurrent_calls_equal_sequential_ones(config, rng):
    problems = [make_problem(*config, 6, 3 + k % 3, 5, 8 + k, rng).cast(np.float32) for k in range(12)]
    sequential = [run_conveyor(p) for p in problems]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run_conveyor, problems))
    for k, (a, b) in enumerate(zip(sequential, concurrent)):
        y, h_T, c_T, grads = a
        y2, h_T2, c_T2, grads2 = b
        np.testing.assert_array_equal(y2, y, err_msg=f"problem {k}: y")
        np.testing.assert_array_equal(h_T2, h_T, err_msg=f"problem {k}: h_T")
        for name, value in grads.items():
            if value is not None:
                np.testing.assert_array_equal(grads2[name], value, err_msg=f"problem {k}: {name}")


def test_threads_share_one_layer_for_inference(rng):
    layer = conveyor.LSTM(4, 16, num_layers=2, seed=0).eval()
    xs = [rng.standard_normal((10, 3, 4)).astype(np.float32) for _ in range(16)]
    expected = [layer(x)[0] for x in xs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda x: layer(x)[0], xs))
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)
