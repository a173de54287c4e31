"""Plants known kernel defects in a copy of the repository and checks that the emulated CUDA suite catches
each of them: evidence that a green `python -m pytest -m cuda` on the CPU (CONVEYOR_EMULATE_CUDA) means
something about the kernels, missing barriers included.

Run it from a checkout (the CUDA toolkit's headers must be installed, nvcc and a GPU need not be):

    python tests/plant_defects.py                  # every defect
    python tests/plant_defects.py --only gemm-barrier-after-load --keep
    python tests/plant_defects.py --venv ~/venvs/emulated   # reuse a venv; it ends with a clean build

It copies the repository's tracked and untracked-but-not-ignored files into a temporary directory, builds the
emulated package from that copy into a virtualenv (--system-site-packages, with scikit-build-core and
pybind11 added when missing), and checks that a focused subset of tests/test_cuda.py passes on the unmodified
copy. Then, for each defect, it applies one exact text substitution to the copy (a pattern that is not found
exactly once is an error, so the script cannot silently test nothing), rebuilds with a fixed build directory
(only the changed file recompiles), runs that defect's subset, records whether it failed (caught) or passed
(MISSED), and restores the file. It prints a table and exits non-zero if any defect was missed.

Time: the first build takes 1-2 minutes, each defect a rebuild of one .cu file (20-50 s; recurrence.cu is
the slow one) plus a few seconds of tests: 3 minutes in all on two idle cores for the 9 defects, 8 on
two busy ones.

What catches each defect (the emulator runs every CUDA thread as a fiber, up to its next barrier, in an
order shuffled between barriers, reproducibly for a given CONVEYOR_EMULATOR_SEED, default 0, which the script
passes through; see docs/emulated-cuda.md):

- A missing barrier after a tile load (forward-barrier-after-load, gemm-barrier-after-load,
  column-sums-barrier): the shuffled schedule runs some thread's reads of shared memory before other threads
  have written it, and shared memory starts as 0xff bytes (NaN), so the outputs turn NaN. On a GPU the
  same bug can pass for a long time, as long as the warps happen to run in step.
- A missing barrier before the next tile overwrites shared memory (forward-barrier-before-overwrite,
  gemm-barrier-before-overwrite): the shuffled schedule lets the first thread past the barrier load its
  part of the next K slice while the others still multiply the current one, so they multiply wrong (finite)
  values. It needs a product of more than one K slice: more than 32 hidden units for the step kernel
  (H = 70), more than 16 terms for the GEMM (dx's 4H = 28 gate columns at H = 7, x W^T's I = 40 at H = 70).
- A wrong index or gate block (forward-row-index, epilogue-column-index, lstm-gates-swapped): plain
  numerical comparison against the float64 reference, on shapes that reach the affected elements (a
  thread's second row needs B > 8: B = 17).
- A tile bound that reads one element past a row (forward-tile-bound): the extra element multiplies a zero
  weight (R's tile keeps its bound), so it only shows because what the last row reads past its end, the
  next step's output, is still NaN (fresh device memory and outputs are NaN-poisoned), and NaN * 0 = NaN:
  "y: 42 non-finite elements". On a GPU the same read would usually go unnoticed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# test_matches_reference on the device arrays, for every cell and option, in float64 and float32, on a
# shape inside one tile of everything (T4-B3-I5-H7) and one across the tile edges (T5-B17-I40-H70: 17 batch
# rows > 16, 70 hidden units > 2 x 32, 40 inputs > 2 x 16): 32 tests, a few seconds.
TILE_EDGES = "test_matches_reference and device and (T4-B3-I5-H7 or T5-B17-I40-H70)"
# The same for the LSTM only.
LSTM_TILE_EDGES = f"{TILE_EDGES} and lstm"


@dataclass(frozen=True)
class Defect:
    name: str
    file: str  # relative to the repository root
    change: str  # what it does, for the table
    find: str  # must occur exactly once in `file`
    replace: str
    tests: str  # pytest -k selection of tests/test_cuda.py expected to catch it


DEFECTS = [
    Defect(
        name="forward-barrier-after-load",
        file="cuda/recurrence.cu",
        change="forward_step_kernel: drop the __syncthreads() after the h and R tiles are loaded",
        find="r_tile[row][kk] = j < H && k < H ? convert<C>(p.R[r_row * H + k]) : C(0);\n"
             "    }\n"
             "    __syncthreads();\n",
        replace="r_tile[row][kk] = j < H && k < H ? convert<C>(p.R[r_row * H + k]) : C(0);\n"
                "    }\n",
        tests=TILE_EDGES,
    ),
    Defect(
        name="forward-barrier-before-overwrite",
        file="cuda/recurrence.cu",
        change="forward_step_kernel: drop the __syncthreads() before the next K slice overwrites the tiles",
        find="        acc[1][g] += h1 * w;\n"
             "      }\n"
             "    }\n"
             "    __syncthreads();\n",
        replace="        acc[1][g] += h1 * w;\n"
                "      }\n"
                "    }\n",
        tests=TILE_EDGES,
    ),
    Defect(
        name="forward-row-index",
        file="cuda/recurrence.cu",
        change="forward_step_kernel: a thread's second row reads h_tile[ty + 7] instead of h_tile[ty + 8]",
        find="const C h0 = h_tile[ty][kk], h1 = h_tile[ty + 8][kk];",
        replace="const C h0 = h_tile[ty][kk], h1 = h_tile[ty + 7][kk];",
        tests=TILE_EDGES,
    ),
    Defect(
        name="epilogue-column-index",
        file="cuda/recurrence.cu",
        change="forward_epilogue: reads x W^T at b * gate_stride + col + 1 (one column off)",
        find="return p.ax[b * p.gate_stride + col] +",
        replace="return p.ax[b * p.gate_stride + col + 1] +",
        tests=TILE_EDGES,
    ),
    Defect(
        name="lstm-gates-swapped",
        file="cuda/recurrence.cu",
        change="forward_epilogue: the LSTM's f and g gate blocks swapped (kF <-> kG)",
        find="constexpr int kF = kCoupled ? 0 : 1, kG = kF + 1, kO = kF + 2;",
        replace="constexpr int kF = kCoupled ? 1 : 2, kG = kF - 1, kO = kF + 1;",
        tests=LSTM_TILE_EDGES,
    ),
    Defect(
        name="forward-tile-bound",
        file="cuda/recurrence.cu",
        change="forward_step_kernel: the h tile loads k <= H instead of k < H (one element past each row)",
        find="h_tile[bb][kk] = b < B && k < H ? convert<C>(h_in[b * H + k])",
        replace="h_tile[bb][kk] = b < B && k <= H ? convert<C>(h_in[b * H + k])",
        tests=TILE_EDGES,
    ),
    Defect(
        name="gemm-barrier-after-load",
        file="cuda/gemm.cu",
        change="gemm_simt_kernel: drop the __syncthreads() after the A and B tiles are loaded",
        find="? convert<Acc>(B.data[k * B.row_stride + n * B.col_stride]) : Acc(0);\n"
             "    }\n"
             "    __syncthreads();\n",
        replace="? convert<Acc>(B.data[k * B.row_stride + n * B.col_stride]) : Acc(0);\n"
                "    }\n",
        tests=TILE_EDGES,
    ),
    Defect(
        name="gemm-barrier-before-overwrite",
        file="cuda/gemm.cu",
        change="gemm_simt_kernel: drop the __syncthreads() before the next K slice overwrites the tiles",
        find="        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];\n"
             "      }\n"
             "    }\n"
             "    __syncthreads();\n",
        replace="        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];\n"
                "      }\n"
                "    }\n",
        tests=TILE_EDGES,
    ),
    Defect(
        name="column-sums-barrier",
        file="cuda/gemm.cu",
        change="column_sums_kernel: drop the __syncthreads() between the partial sums and their total",
        find="  partial[ty][tx] = sum;\n"
             "  __syncthreads();\n",
        replace="  partial[ty][tx] = sum;\n",
        tests=TILE_EDGES,
    ),
]


class ScriptError(RuntimeError):
    """The script could not do its job (a pattern not found, a failed build, no tests selected)."""


def copy_repository(destination: Path) -> None:
    """The files git would commit: tracked ones and untracked ones that are not ignored."""
    command = ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(command, check=True, capture_output=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = REPO / relative
        if not source.is_symlink() and not source.is_file():
            continue  # deleted in the working tree, or a submodule's directory
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


# Import name -> distribution name. pytest, NumPy and hypothesis are what the suite imports; the build needs
# the other two with --no-build-isolation.
REQUIRED_MODULES = {"scikit_build_core": "scikit-build-core", "pybind11": "pybind11", "numpy": "numpy",
                    "pytest": "pytest", "hypothesis": "hypothesis"}


def prepare_venv(venv: Path) -> Path:
    """The venv's python, after creating the venv if needed and installing what it lacks."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating a virtualenv in {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)

    def imports(module: str) -> bool:
        return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0

    missing = [dist for module, dist in REQUIRED_MODULES.items() if not imports(module)]
    if missing:
        print(f"installing {', '.join(missing)}", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *missing], check=True)
    torch = "found" if imports("torch") else "not found (the subsets chosen here do not need it)"
    print(f"PyTorch {torch}", flush=True)
    return python


def child_environment() -> dict:
    env = dict(os.environ)
    # The tests must import the package just built into the venv, never a checkout's python/ directory.
    env.pop("PYTHONPATH", None)
    env["CMAKE_ARGS"] = "-DCONVEYOR_EMULATE_CUDA=ON"
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    return env


def build(python: Path, copy: Path, build_dir: Path) -> str:
    """Builds and installs the emulated package from the copy; returns the installed module's sha256.

    --force-reinstall, so that pip never keeps a previous build of the same version."""
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--force-reinstall",
         str(copy), "-C", f"build-dir={build_dir}"],
        env=child_environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise ScriptError(f"the build failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    locate = ("import conveyor; from conveyor import _conveyor; "
              "assert conveyor.cuda_emulated(), 'not an emulated build'; print(_conveyor.__file__)")
    module = subprocess.run([str(python), "-c", locate], env=child_environment(), capture_output=True,
                            text=True, cwd=build_dir.parent)
    if module.returncode != 0:
        raise ScriptError(f"the built package does not import as an emulated build:\n{module.stderr[-4000:]}")
    return hashlib.sha256(Path(module.stdout.strip()).read_bytes()).hexdigest()


@dataclass
class SuiteRun:
    failed: bool
    seconds: float
    summary: str  # pytest's last line
    first_failure: str  # the first failing test's id, or ""


def run_tests(python: Path, copy: Path, selection: str) -> SuiteRun:
    start = time.monotonic()
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-x", "-m", "cuda", "-p", "no:cacheprovider",
         str(copy / "tests" / "test_cuda.py"), "-k", selection],
        env=child_environment(), capture_output=True, text=True, cwd=copy.parent)
    seconds = time.monotonic() - start
    lines = (result.stdout + result.stderr).strip().splitlines()
    summary = lines[-1] if lines else ""
    # 0: passed; 1: a test failed; a negative code: the run crashed (a kernel fault may abort), which also
    # shows the defect. Anything else (no test selected, a usage or internal error) means the check is broken.
    if result.returncode not in (0, 1) and result.returncode >= 0:
        tail = "\n".join(lines[-30:])
        raise ScriptError(f"pytest -k {selection!r} exited with {result.returncode}:\n{tail}")
    if "passed" not in summary and "failed" not in summary and result.returncode >= 0:
        raise ScriptError(f"pytest -k {selection!r} ran no test ({summary}); is the build emulated?")
    if result.returncode < 0:
        summary = f"crashed with signal {-result.returncode}"
    # -ra (the project's addopts) lists failures as "FAILED <id> - <message>".
    failures = [line.split()[1] for line in lines if line.startswith("FAILED ")]
    return SuiteRun(failed=result.returncode != 0, seconds=seconds, summary=summary,
                    first_failure=failures[0] if failures else "")


def plant(copy: Path, defect: Defect) -> bytes:
    """Applies the defect; returns the file's original text, for restoring."""
    path = copy / defect.file
    original = path.read_bytes()  # bytes: restoring gives back the file exactly, line endings included
    text = original.decode("utf-8")
    count = text.count(defect.find)
    if count != 1:
        raise ScriptError(f"{defect.name}: the pattern occurs {count} times in {defect.file}, not once:\n"
                          f"{defect.find}")
    path.write_bytes(text.replace(defect.find, defect.replace).encode("utf-8"))
    return original


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    header = ("defect", "file", "what it changes", "result")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (copy, build, venv)")
    parser.add_argument("--venv", type=Path,
                        help="use (or create) this virtualenv instead of a temporary one; it is left with a "
                             "clean emulated build of the copy")
    parser.add_argument("--only", choices=[d.name for d in DEFECTS], action="append", metavar="NAME",
                        help="plant only this defect (repeatable): " + ", ".join(d.name for d in DEFECTS))
    args = parser.parse_args()
    defects = [d for d in DEFECTS if args.only is None or d.name in args.only]

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="conveyor-defects-"))
    copy, build_dir = work / "repo", work / "build"
    python = None
    venv_holds_a_defect = False  # the last build installed has a defect planted
    try:
        copy_repository(copy)
        python = prepare_venv(args.venv.resolve() if args.venv else work / "venv")

        print("building the unmodified copy", flush=True)
        last_module = build(python, copy, build_dir)
        # One run over the union of the subsets: every test that should catch a defect must pass without it.
        union = " or ".join(f"({s})" for s in dict.fromkeys(d.tests for d in defects))
        baseline = run_tests(python, copy, union)
        print(f"unmodified copy: {baseline.summary} ({baseline.seconds:.0f} s)", flush=True)
        if baseline.failed:
            raise ScriptError(f"the subset fails on the unmodified copy ({baseline.first_failure}), so a "
                              "failure with a defect would prove nothing")

        rows, missed = [], []
        for defect in defects:
            defect_started = time.monotonic()
            original = plant(copy, defect)
            try:
                venv_holds_a_defect = True
                module = build(python, copy, build_dir)
                if module == last_module:
                    raise ScriptError(f"{defect.name}: the rebuilt module is identical to the previous "
                                      "build, so the defect was not compiled in")
                last_module = module
                outcome = run_tests(python, copy, defect.tests)
            finally:
                (copy / defect.file).write_bytes(original)
            result = "caught" if outcome.failed else "MISSED"
            if not outcome.failed:
                missed.append(defect.name)
            rows.append((defect.name, defect.file, defect.change, result))
            caught_by = f", first by {outcome.first_failure}" if outcome.first_failure else ""
            print(f"{defect.name}: {result} ({outcome.summary}{caught_by}; "
                  f"{time.monotonic() - defect_started:.0f} s with the rebuild)", flush=True)

        print()
        print_table(rows)
        elapsed = time.monotonic() - started
        print(f"\n{len(rows) - len(missed)} of {len(rows)} defects caught in {elapsed:.0f} s")
        if missed:
            print(f"MISSED: {', '.join(missed)}")
        return 1 if missed else 0
    except ScriptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if venv_holds_a_defect and (args.venv or args.keep):
            # Every planted file has been restored by now; a venv that outlives the run gets a correct build.
            print("rebuilding the unmodified copy into the kept venv", flush=True)
            try:
                build(python, copy, build_dir)
            except ScriptError as e:
                print(f"warning: {python} keeps a build with a defect planted: {e}", file=sys.stderr)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
