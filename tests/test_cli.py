"""The ``conveyor`` command: demo, --version, train / sample / eval on checkpoints that know their model and
data, and every error a user can cause as one line without a traceback."""

import io
import re
import subprocess
import sys

import numpy as np
import pytest

from conveyor import __version__
from conveyor.cli import main
from conveyor.train import checkpoint
from conveyor.train.progress import Progress

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\n") * 30
SMALL = ["--layers", "1", "--hidden", "16", "--embedding", "8", "--batch", "4", "--bptt", "8",
         "--sample", "0", "--eval-every", "0"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def conveyor(*argv, check=True):
    out = subprocess.run([sys.executable, "-m", "conveyor", *argv], capture_output=True, text=True,
                         timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def one_line_error(out, flag):
    """An error a user caused: exit status 2, one line on stderr that names the flag, no traceback."""
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr and flag in lines[0], lines[0]
    return lines[0]


def test_demo_loss_falls():
    out = conveyor("demo", "--steps", "150", "--print-every", "50")
    first, last = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", out.stdout).groups())
    assert first > 0.6  # chance level for a bit is ln 2 = 0.693
    assert last < 0.1, out.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"conveyor {__version__}"


def test_train_with_a_plot(text_file, tmp_path):
    plot = tmp_path / "curves.png"
    out = conveyor("train", "--data", text_file, *SMALL[:-4], "--max-steps", "6", "--eval-every", "3",
                   "--sample", "20", "--plot", str(plot))
    assert "validation" in out.stdout and "--- sample" in out.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out.stdout
    else:
        assert plot.exists() and plot.stat().st_size > 1000


def test_resume_needs_no_other_flag_and_continues_exactly(text_file, tmp_path):
    """`train --resume ck` alone rebuilds the model and data from the checkpoint, keeps saving there, and
    ends where an unbroken run ends, bit for bit."""
    straight, broken = str(tmp_path / "straight.npz"), str(tmp_path / "broken.npz")
    common = ["--data", text_file, *SMALL, "--dropout", "0.1", "--cell", "gru", "--seed", "4"]
    conveyor("train", *common, "--max-steps", "10", "--checkpoint", straight)
    conveyor("train", *common, "--max-steps", "6", "--checkpoint", broken)
    out = conveyor("train", "--resume", broken, "--max-steps", "10")
    assert "resumed from" in out.stdout and "at step 6" in out.stdout
    (meta_a, arrays_a), (meta_b, arrays_b) = checkpoint.load(straight), checkpoint.load(broken)
    assert meta_b["trainer"]["step"] == 10
    assert meta_a["trainer"]["history"] == meta_b["trainer"]["history"]
    for name, value in arrays_a.items():
        np.testing.assert_array_equal(arrays_b[name], value, err_msg=name)


@pytest.mark.parametrize("flag", [["--hidden", "32"], ["--cell", "lstm"], ["--layers", "2"],
                                  ["--optimizer", "sgd"], ["--level", "word"], ["--bptt", "16"]],
                         ids=lambda f: f[0])
def test_resume_refuses_a_contradicting_flag_by_name(flag, text_file, tmp_path):
    path = str(tmp_path / "ck.npz")
    conveyor("train", "--data", text_file, *SMALL, "--cell", "gru", "--max-steps", "2", "--checkpoint", path)
    line = one_line_error(conveyor("train", "--resume", path, *flag, check=False), flag[0])
    assert "was trained with" in line


def test_resume_follows_moved_data_and_refuses_other_data(text_file, tmp_path):
    path = str(tmp_path / "ck.npz")
    conveyor("train", "--data", text_file, *SMALL, "--max-steps", "2", "--checkpoint", path)
    moved = tmp_path / "moved.txt"
    (tmp_path / "corpus.txt").rename(moved)
    one_line_error(conveyor("train", "--resume", path, check=False), "--data")
    one_line_error(conveyor("eval", path, check=False), "--data")
    assert "valid split of" in conveyor("eval", path, "--data", str(moved), "--split", "valid").stdout
    resumed = conveyor("train", "--resume", path, "--data", str(moved), "--max-steps", "3")
    assert "resumed from" in resumed.stdout
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper())
    assert "not the data" in one_line_error(conveyor("train", "--resume", path, "--data", str(other),
                                                     check=False), "--data")


def test_resume_of_a_missing_or_foreign_file_is_one_line(tmp_path):
    one_line_error(conveyor("train", "--resume", str(tmp_path / "none.npz"), check=False), "--resume")
    (tmp_path / "pickle.npz").write_bytes(b"\x80\x04K\x01.")
    one_line_error(conveyor("train", "--resume", str(tmp_path / "pickle.npz"), check=False), "--resume")


@pytest.mark.parametrize("argv", [
    ["train", "--clip", "-1"], ["train", "--eval-every", "-1"], ["train", "--decay-after", "-3"],
    ["train", "--lr-decay", "5"], ["train", "--sample", "-5"], ["train", "--batch", "abc"],
    ["train", "--batch", "100000"], ["train", "--dropout", "1.5"], ["train", "--lr", "nan"],
    ["train", "--hidden", "0"], ["train", "--bptt", "8", "--bptt2", "4"], ["train", "--tie"],
    ["train", "--task", "music", "--bptt", "8"], ["train", "--task", "music"],
    ["train", "--task", "classify"], ["train", "--data", "/nonexistent/corpus.txt"],
    ["train", "--checkpoint", "/nonexistent/folder/ck.npz"], ["demo", "--hidden", "-3"],
    ["demo", "--delay", "40", "--window", "32"], ["sample", "/nonexistent.npz"],
    ["eval", "/nonexistent.npz"]], ids=lambda argv: "_".join(argv).replace("/", ""))
def test_bad_input_is_one_line_naming_the_flag(argv):
    flag = next((a for a in reversed(argv) if a.startswith("--")), "checkpoint")
    flag = {"--window": "--delay", "--bptt": "--bptt2" if "--bptt2" in argv else "--bptt"}.get(flag, flag)
    if argv[:2] == ["train", "--task"] and len(argv) == 3:
        flag = "--data"
    one_line_error(conveyor(*argv, check=False), flag)


def test_a_binary_data_file_is_named(tmp_path):
    data = tmp_path / "binary.txt"
    data.write_bytes(bytes(range(256)) * 40)
    line = one_line_error(conveyor("train", "--data", str(data), check=False), "--data")
    assert "binary.txt" in line and "UTF-8" in line


def test_debug_shows_the_traceback():
    out = conveyor("train", "--debug", "--data", "/nonexistent/corpus.txt", check=False)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_sample_and_eval_from_a_checkpoint(text_file, tmp_path):
    path = str(tmp_path / "ck.npz")
    trained = conveyor("train", "--data", text_file, *SMALL, "--max-steps", "30", "--checkpoint", path)
    text = conveyor("sample", path, "--length", "60", "--prime", "To be", "--seed", "1").stdout
    assert text.startswith("To be") and len(text.rstrip("\n")) >= 60 + len("To be") - 1
    assert set(text) <= set(TEXT) | {"\n"}
    assert conveyor("sample", path, "--length", "60", "--prime", "To be", "--seed", "1").stdout == text
    assert conveyor("sample", path, "--length", "60", "--prime", "To be", "--seed", "2").stdout != text
    one_line_error(conveyor("sample", path, "--prime", "Zebra", check=False), "--prime")
    test_figure = re.search(r"^test ([0-9.]+) nats/char", trained.stdout, re.M).group(1)
    evaluated = conveyor("eval", path).stdout
    assert "test split" in evaluated and f"{test_figure} nats/char" in evaluated
    assert "valid split" in conveyor("eval", path, "--split", "valid").stdout


def test_progress_redraws_in_place_within_the_terminal_width():
    """On an 80-column terminal (a pseudo-terminal), the bar redraws one line and never wraps."""
    pty = pytest.importorskip("pty", reason="needs a POSIX pseudo-terminal")
    import fcntl
    import os
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    os.set_blocking(master, False)
    out, received = os.fdopen(slave, "w"), b""
    progress = Progress(out, 0, 500, 20, "tokens")
    for step in range(1, 501):
        progress.update(step, 1.2345, "1.2345 nats/char (1.781 bits/char)", 12345.0)
        if step % 50 == 0:
            progress.write(f"step {step}: validation 1.5")
        out.flush()
        try:
            received += os.read(master, 1 << 20)
        except BlockingIOError:
            pass
    progress.close()
    out.close()
    try:
        received += os.read(master, 1 << 20)
    except (BlockingIOError, OSError):
        pass
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", received.decode())
    frames = [f for f in re.split(r"[\r\n]", text) if f.strip()]
    assert text.count("\r") > 20  # redrawn in place
    assert max(len(f) for f in frames) <= 80, max(frames, key=len)
    assert "tokens/s" in text and "500/500" in text and "step 450: validation 1.5" in text
    assert re.search(r"\|#{5,}|\u2588{5,}", text)  # the bar itself has room on 80 columns


def test_progress_elsewhere_prints_periodic_lines():
    out = io.StringIO()
    progress = Progress(out, 0, 100, 20, "frames")
    for step in range(1, 101):
        progress.update(step, 9.0, "9.000 nats/frame", 1000.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6 and lines[0].startswith("step 1/100") and "ETA" in lines[-1]
