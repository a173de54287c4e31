"""The README runs as written: every Python block executes (in a fresh interpreter, in a scratch folder);
every shell command it shows names commands, subcommands, flags, files and extras that exist; and it links
nothing outside the repository."""

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def shell_commands():
    """The commands of the README's indented (4-space) blocks, continuation lines joined, split on &&."""
    commands, in_block, previous_blank = [], False, True
    lines = README.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("    ") and (previous_blank or in_block):
            in_block = True
            text = line.strip()
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1] + " " + lines[i].strip()
            commands += [part.strip() for part in text.split("&&")]
        else:
            in_block = False
        previous_blank = not line.strip()
        i += 1
    return commands


COMMANDS = shell_commands()


def extras():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]")[1].split("\n[")[0]
    return set(re.findall(r"^(\w+)\s*=", section, re.M))


def help_of(subcommand):
    out = subprocess.run([sys.executable, "-m", "conveyor", subcommand, "--help"], capture_output=True,
                         text=True, check=True)
    return out.stdout


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(index, tmp_path):
    code = PYTHON_BLOCKS[index]
    if re.search(r"^import torch|^import conveyor.torch", code, re.M):
        pytest.importorskip("torch", reason="this README block is the PyTorch drop-in")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0, f"README Python block {index}:\n{code}\n{out.stderr}"


def test_the_readme_shows_the_set_up_commands():
    assert "pip install . && conveyor train" in README
    assert 'pip install ".[test]" && python -m pytest' in README
    assert len(PYTHON_BLOCKS) >= 2 and len(COMMANDS) >= 10


@pytest.mark.parametrize("command", COMMANDS)
def test_shell_command_names_what_exists(command):
    words = [w for w in shlex.split(command) if not re.match(r"^[A-Z_]+=", w)]
    program, args = words[0], words[1:]
    for path in (w for w in words if re.match(r"^(bench|tests|examples|docs)/", w)):
        assert (ROOT / path).exists(), f"{command}: no file {path}"
    if program == "pip":
        assert args[0] == "install"
        for spec in args[1:]:
            match = re.fullmatch(r"\.(?:\[(\w+)\])?", spec)
            if match and match.group(1):
                assert match.group(1) in extras(), f"{command}: no extra {match.group(1)!r} in pyproject.toml"
    elif program == "conveyor":
        assert args, command
        text = help_of(args[0])
        for flag in (a for a in args[1:] if a.startswith("--")):
            assert flag in text, f"{command}: conveyor {args[0]} has no {flag}"
    elif program in ("python", "bash"):
        script = next(a for a in args if not a.startswith("-")) if args[:2] != ["-m", "pytest"] else None
        if args[:1] == ["-m"]:
            assert args[1] in ("pytest", "conveyor"), command
        elif script is not None:
            assert (ROOT / script).is_file(), f"{command}: no file {script}"
    else:
        assert program in ("cmake", "ctest", "nsys", "ncu"), f"unexpected program in the README: {command}"


def test_inline_commands_name_files_that_exist():
    for script in re.findall(r"`(?:python|bash) ((?:bench|tests|examples)/[\w./-]+)", README):
        assert (ROOT / script).is_file(), script


def test_links_stay_inside_the_repository():
    for target in re.findall(r"\]\(([^)]+)\)", README):
        if target.startswith(("http://", "https://", "#")):
            continue
        path = target.split("#")[0]
        assert not path.startswith(("..", "/")), f"README links outside the repository: {target}"
        assert (ROOT / path).exists(), f"README links to a missing file: {target}"
    assert "../shared" not in README and "SPEC.md" not in README
