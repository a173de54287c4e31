"""The progress display of every task: on a terminal, a tqdm bar that fits the terminal's width and redraws
itself in place (step, loss, units per second, elapsed and ETA); elsewhere (logs, CI, pipes), a plain line
every ``every`` steps with the same figures. tqdm does the terminal part better than a hand-written bar would
(width changes, Unicode fallbacks, Windows consoles, notebooks), so it is a dependency."""

from __future__ import annotations

import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, out, first: int, total: int, every: int, unit: str):
        self.out, self.first, self.total, self.every, self.unit = out, first, total, every, unit
        self.start = time.perf_counter()
        self.bar = None
        if hasattr(out, "isatty") and out.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=first, file=out, dynamic_ncols=True, unit="step",
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
                            desc="train", leave=True)

    def update(self, step: int, loss: float, described: str, rate: float) -> None:
        """``loss`` as a number for the bar, ``described`` (with its units) for the lines."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {rate:,.0f} {self.unit}/s", refresh=False)
            self.bar.update(step - self.bar.n)
        elif step == self.first + 1 or step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            done = step - self.first
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total} ({step / self.total:.0%}) loss {described}, {rate:,.0f} "
                  f"{self.unit}/s, {_clock(elapsed)} elapsed, ETA {_clock(eta)}", file=self.out, flush=True)

    def write(self, text: str) -> None:
        """A line of its own (validation, checkpoint) that the bar does not overwrite."""
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
