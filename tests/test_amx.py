"""Float32 products on AMX tiles (conveyor.use_amx; csrc/cpu/amx.h): windows of every cell against the float64
reference with the float32 tolerances, not the bits of the AVX path (so the tiles really ran), the same bits
on one thread and two and in a window split in two, and the switch. The C++ test test_gemm covers the
products themselves (edges, alpha and beta, layouts, exact splits). Where the processor has no AMX the
tests that need it say so and skip: the rest of the suite checks the AVX path there."""

import os
import subprocess
import sys

import numpy as np
import pytest

import conveyor

from support import CONFIGS, assert_all_close, config_id, make_problem, run_conveyor, run_reference


def amx_present() -> bool:
    previous = conveyor.use_amx(True)
    present = conveyor.using_amx()
    conveyor.use_amx(previous)
    return present


needs_amx = pytest.mark.skipif(not amx_present(), reason="no AMX on this processor (or the kernel refused "
                               "the tile state): every product runs on the AVX path, which the suite checks")

# I, H >= 128: the input projection, the per-step products and the backward's on the tiles; B = 3 and T = 5:
# partial tiles of rows and of K (I = 130 is 4 chunks of 32 and 2 values).
T, B, I, H = 5, 3, 130, 128


@pytest.fixture
def amx():
    """Runs a function with AMX on or off, restoring the setting after."""
    saved = conveyor.using_amx()

    def run(on, fn):
        conveyor.use_amx(on)
        assert conveyor.using_amx() == (on and amx_present())
        return fn()

    yield run
    conveyor.use_amx(saved)


def test_use_amx_takes_a_bool_and_returns_the_previous_setting(amx):
    with pytest.raises(TypeError, match="on: expected True or False, got 1 of type int"):
        conveyor.use_amx(1)
    conveyor.use_amx(False)
    assert conveyor.use_amx(True) is False
    assert conveyor.use_amx(False) is amx_present()
    assert conveyor.using_amx() is False


@needs_amx
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_windows_on_amx_match_the_reference_and_differ_from_avx(config, amx, rng):
    p = make_problem(*config, T, B, I, H, rng)
    expected = run_reference(p)
    p32 = p.cast(np.float32)
    on_tiles = amx(True, lambda: run_conveyor(p32))
    on_avx = amx(False, lambda: run_conveyor(p32))
    for got in (on_tiles, on_avx):
        assert_all_close({"y": got[0], "h_T": got[1], **got[3]}, {"y": expected[0], "h_T": expected[1],
                                                                  **expected[3]}, np.float32)
    # The tiles' sums are rounded in another order: equal bits would mean they did not run.
    assert not np.array_equal(on_tiles[0], on_avx[0]), "y: the same bits with AMX on and off"
    assert not np.array_equal(on_tiles[3]["dW"], on_avx[3]["dW"]), "dW: the same bits with AMX on and off"


@needs_amx
def test_amx_windows_give_the_same_bits_on_one_thread_and_two_and_split_in_two(amx, rng):
    p = make_problem("lstm", {}, 2 * T, B, I, H, rng).cast(np.float32)
    saved_threads = conveyor.num_threads()
    try:
        conveyor.set_num_threads(1)
        one = amx(True, lambda: conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0))
        conveyor.set_num_threads(2)
        two = amx(True, lambda: conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0))
    finally:
        conveyor.set_num_threads(saved_threads)
    np.testing.assert_array_equal(one[0], two[0])
    # The first T steps, then the next T from their final state: the input projection's rows differ in
    # number, the sums do not.
    first = amx(True, lambda: conveyor.lstm_forward(p.x[:T], p.W, p.R, p.bW, p.bR, p.h0, p.c0))
    second = amx(True, lambda: conveyor.lstm_forward(p.x[T:], p.W, p.R, p.bW, p.bR, first[1], first[2]))
    np.testing.assert_array_equal(np.concatenate([first[0], second[0]]), one[0])


# In a child process: a tile instruction of ours on unconfigured tiles is SIGILL, which would end the run.
BESIDE_ONEDNN = """
import numpy as np, torch, conveyor, conveyor.torch
torch.set_num_threads(2)
conveyor.set_num_threads(2)
assert conveyor.sharing_openmp_threads() and conveyor.using_amx()
rng = np.random.default_rng(0)
x = rng.uniform(-1, 1, (8, 32, 256)).astype(np.float32)
W, R = (rng.uniform(-0.06, 0.06, (1024, 256)).astype(np.float32) for _ in range(2))
expected = conveyor.lstm_forward(x, W, R, None, None)[0]
a = torch.randn(512, 512, dtype=torch.bfloat16)
for _ in range(5):
    a @ a  # oneDNN's bfloat16 product: the tiles, on the OpenMP threads our work shares, released after
    assert np.array_equal(conveyor.lstm_forward(x, W, R, None, None)[0], expected)
print("ok")
"""


@needs_amx
def test_amx_windows_run_after_another_library_released_the_tiles_on_their_threads():
    pytest.importorskip("torch")
    out = subprocess.run([sys.executable, "-c", BESIDE_ONEDNN], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stdout,
                                                                out.stderr[-2000:])


@pytest.mark.parametrize("setting", [None, "0"])
def test_info_names_the_products_and_the_environment_turns_amx_off(setting):
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_CPU_AMX"}
    if setting is not None:
        env["CONVEYOR_CPU_AMX"] = setting
    out = subprocess.run([sys.executable, "-m", "conveyor", "info"], capture_output=True, text=True,
                         check=True, env=env)
    expected = "AMX tiles" if amx_present() and setting is None else "AVX/FMA units"
    assert f"CPU products:       float32 on {expected}" in out.stdout
