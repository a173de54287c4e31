"""The CPU backend on the threads of the process's OpenMP runtime (conveyor.share_openmp_threads), which
``import conveyor.torch`` turns on: found where PyTorch has loaded libgomp, the same bits as one thread and
as Conveyor's own pool, concurrent calls from several Python threads included, a call whose OpenMP threads
are asleep on the own pool, and back to the pool on request."""

import os
import select
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import conveyor
from conveyor import _conveyor

from support import CONFIGS, config_id, make_problem, run_conveyor

torch = pytest.importorskip("torch")
import conveyor.torch  # noqa: E402,F401  (turns the sharing on)

# Several groups of units a step on 2 threads, the last narrower (as in test_unit_groups).
T, B, I, H = 4, 24, 20, 176


def libgomp_loaded() -> bool:
    if not os.path.exists("/proc/self/maps"):
        return False
    with open("/proc/self/maps") as maps:
        return any("libgomp" in line for line in maps)


@pytest.fixture
def on_runtime():
    """Runs fn on `threads` threads of the OpenMP runtime (share=True; every call there, whatever the state
    of its threads) or of the own pool, checks which ran the last call's parallel work, then restores."""
    saved_threads, saved_sharing = conveyor.num_threads(), conveyor.sharing_openmp_threads()

    def run(share, threads, fn, *, on_this_thread=True):
        assert conveyor.share_openmp_threads(share) == share
        assert conveyor.sharing_openmp_threads() == share
        conveyor.set_num_threads(threads)
        _conveyor._set_check_openmp_team(False)
        try:
            result = fn()
        finally:
            _conveyor._set_check_openmp_team(True)
        if on_this_thread:  # what ran the work is known to the thread that called
            expected = "none" if threads == 1 else "openmp" if share else "pool"
            assert _conveyor._last_parallel_runtime() == expected
        return result

    yield run
    conveyor.set_num_threads(saved_threads)
    conveyor.share_openmp_threads(saved_sharing)


def assert_same_bits(got, expected, what):
    y, h_T, c_T, grads = got
    ey, eh_T, ec_T, egrads = expected
    np.testing.assert_array_equal(y, ey, err_msg=f"{what}: y")
    np.testing.assert_array_equal(h_T, eh_T, err_msg=f"{what}: h_T")
    if c_T is not None:
        np.testing.assert_array_equal(c_T, ec_T, err_msg=f"{what}: c_T")
    for name, value in egrads.items():
        if value is not None:
            np.testing.assert_array_equal(grads[name], value, err_msg=f"{what}: {name}")


def test_importing_conveyor_torch_shares_the_loaded_runtime():
    # Linux builds of PyTorch load GNU OpenMP; where a build does not, sharing must stay off.
    assert conveyor.sharing_openmp_threads() == libgomp_loaded()
    assert conveyor.share_openmp_threads(False) is False
    assert not conveyor.sharing_openmp_threads()
    assert conveyor.share_openmp_threads(True) == libgomp_loaded()
    with pytest.raises(TypeError, match="share: expected True or False, got 1"):
        conveyor.share_openmp_threads(1)


@pytest.mark.skipif(not libgomp_loaded(), reason="this PyTorch build loads no GNU OpenMP runtime")
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_openmp_threads_give_the_bits_of_one_thread_and_of_the_pool(config, threads, on_runtime, rng):
    p = make_problem(*config, T, B, I, H, rng).cast(np.float32)
    shared = on_runtime(True, threads, lambda: run_conveyor(p))
    assert_same_bits(shared, on_runtime(False, 1, lambda: run_conveyor(p)), "one thread")
    assert_same_bits(shared, on_runtime(False, threads, lambda: run_conveyor(p)), "own pool")


@pytest.mark.skipif(not libgomp_loaded(), reason="this PyTorch build loads no GNU OpenMP runtime")
def test_concurrent_calls_on_openmp_threads_equal_sequential_ones(on_runtime, rng):
    sizes = [(5, 16 + k % 3, 12, 96 + 16 * (k % 2)) for k in range(8)]
    problems = [make_problem(*CONFIGS[k % len(CONFIGS)], *size, rng).cast(np.float32)
                for k, size in enumerate(sizes)]

    def concurrently():
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(run_conveyor, problems))

    sequential = on_runtime(False, 1, lambda: [run_conveyor(p) for p in problems])
    concurrent = on_runtime(True, 2, concurrently, on_this_thread=False)
    for k, (got, expected) in enumerate(zip(concurrent, sequential)):
        assert_same_bits(got, expected, f"problem {k}")


@pytest.mark.skipif(not libgomp_loaded(), reason="this PyTorch build loads no GNU OpenMP runtime")
@pytest.mark.skipif("OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ,
                    reason="the runtime's threads spin as the environment says, not for their default time")
def test_a_call_whose_openmp_threads_sleep_runs_on_the_pool(on_runtime, rng):
    p = make_problem(*CONFIGS[0], T, B, I, H, rng).cast(np.float32)
    expected = on_runtime(False, 1, lambda: run_conveyor(p))
    saved_threads = conveyor.num_threads()
    conveyor.set_num_threads(2)
    try:
        assert conveyor.share_openmp_threads(True)
        run_conveyor(p)  # a region on the team, so that its workers are known
        # GNU OpenMP's threads spin for a few milliseconds after a region by default, then sleep.
        time.sleep(0.5)
        asleep = run_conveyor(p)
        assert _conveyor._last_parallel_runtime() == "pool"
        assert_same_bits(asleep, expected, "threads asleep")
    finally:
        conveyor.set_num_threads(saved_threads)


@pytest.mark.skipif(not libgomp_loaded() or not hasattr(os, "fork"), reason="needs GNU OpenMP and fork()")
def test_a_forked_child_runs_on_its_own_pool(on_runtime, rng):
    """A child of fork() has no OpenMP threads, and GNU OpenMP waits for them forever: the child must not
    hang, and must give the parent's bits."""
    p = make_problem(*CONFIGS[0], T, B, I, H, rng).cast(np.float32)
    expected = on_runtime(True, 2, lambda: run_conveyor(p))  # the parent's team exists and is used
    assert conveyor.sharing_openmp_threads()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        try:
            got = run_conveyor(p)
            same = all(np.array_equal(a, b) for a, b in zip(got[:2], expected[:2]))
            report = f"{same} {conveyor.sharing_openmp_threads()} {_conveyor._last_parallel_runtime()}"
            os.write(write_end, report.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 60)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the forked child did not finish its call in 60 s")
        assert os.read(read_end, 100).decode() == "True False pool"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
