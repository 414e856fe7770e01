"""Progress of long work, the way the HF ecosystem shows it: a tqdm bar on a terminal, plain lines in a log.

On a terminal (stderr is a TTY) a `tqdm` bar on stderr shows the count, the rate and the time left, as the Trainer
and `datasets` do; `is_terminal` is that test, and training applies it to the Trainer's own bar. When stderr is not
a terminal (a log file, a pipe, CI) a bar would write hundreds of carriage returns, so one line on stdout replaces
it, at most one per `interval` seconds (a minute by default) and, once any was written, one at the end: work that
ends within the interval stays quiet. `enabled=False` (the command line's `--no-progress`) shows nothing.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm.auto import tqdm

LINE_INTERVAL_SECONDS = 60.0  # at most one progress line a minute in a log


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether progress on `stream` (sys.stderr by default) may be a bar: the one test for every bar the package
    shows, the Trainer's included (`TrainingOptions.training_arguments`)."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)  # sys.stderr is None under pythonw, and a stand-in may lack isatty
    return bool(isatty is not None and isatty())


class Progress:
    """Counts `total` units of one step (`description`), with optional extra figures such as tokens per second."""

    def __init__(
        self,
        total: int,
        description: str,
        *,
        unit: str = "batch",
        enabled: bool = True,
        interval: float | None = None,
        stderr: TextIO | None = None,
        stdout: TextIO | None = None,
    ) -> None:
        self.total, self.description, self.unit = total, description, unit
        self.done = 0
        self.start = self.last_line = time.monotonic()
        self.interval = LINE_INTERVAL_SECONDS if interval is None else interval
        self.extra = ""
        self.lines_written = 0
        self._stdout = stdout
        stderr = stderr if stderr is not None else sys.stderr
        self.mode = "off" if not enabled else ("bar" if is_terminal(stderr) else "lines")
        self._bar = tqdm(total=total, desc=description, unit=unit, file=stderr) if self.mode == "bar" else None

    def update(self, count: int = 1, **figures: float) -> None:
        """`count` more units done; `figures` (e.g. tokens_per_s=12.5) are shown beside the count."""
        self.done += count
        if figures:
            self.extra = ", ".join(f"{name.replace('_per_', '/')} {value:.3g}" for name, value in figures.items())
        if self._bar is not None:
            if figures:
                self._bar.set_postfix_str(self.extra, refresh=False)
            self._bar.update(count)
        elif self.mode == "lines" and self.done < self.total and time.monotonic() - self.last_line >= self.interval:
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self.lines_written and self.done == self.total:
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        plural = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")
        text = f"    {self.description}: {self.done}/{self.total} {plural} in {elapsed:.0f} s"
        if self.done < self.total:
            text += f", about {left:.0f} s left"
        if self.extra:
            text += f" ({self.extra})"
        print(text, file=self._stdout if self._stdout is not None else sys.stdout, flush=True)
        self.last_line = time.monotonic()
        self.lines_written += 1

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
