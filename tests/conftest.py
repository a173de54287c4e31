import zlib

import numpy as np
import pytest

import conveyor
from conveyor import _conveyor


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every output array starts as NaN, so an element that Conveyor forgets to write fails the test."""
    _conveyor._set_poison_outputs(True)
    yield
    _conveyor._set_poison_outputs(False)


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
    # Skip on the presence of a GPU and of the backend, not on cuda_available(): on a GPU machine a broken
    # build must fail the CUDA tests, not skip them.
    if conveyor.cuda_built() and conveyor.cuda_device_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and the CUDA backend")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
