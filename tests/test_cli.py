"""The main job until the trainer lands: `conveyor demo` trains an LSTM on a toy task and the loss falls."""

import re
import subprocess
import sys


def test_demo_loss_falls():
    out = subprocess.run([sys.executable, "-m", "conveyor", "demo", "--steps", "150", "--print-every", "50"],
                         capture_output=True, text=True, check=True, timeout=300)
    first, last = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", out.stdout).groups())
    assert first > 0.6  # chance level for a bit is ln 2 = 0.693
    assert last < 0.1, out.stdout


def test_demo_rejects_an_impossible_delay():
    out = subprocess.run([sys.executable, "-m", "conveyor", "demo", "--delay", "40", "--window", "32"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "--delay" in out.stderr
