"""Progress of long work, for a person at a terminal and for a batch job's log alike.

On a terminal it is a tqdm bar. Elsewhere (a SLURM log, a file, a pipe) a bar's carriage returns
never make a line, so a plain line is printed every MEGADOC_PROGRESS_SECONDS seconds (default 30;
0: at every update) with what is done, the rate and the time left, and one last line at the end:

    preprocess: 4.19M of 10.5M bytes (40%), 1.02M bytes/s, elapsed 00:04, ETA 00:06
    preprocess: done, 10.5M bytes in 00:10, 1.05M bytes/s
"""

from __future__ import annotations

import os
import sys
import time

from megadoc_megatron.errors import InputError

SECONDS_VARIABLE = "MEGADOC_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def line_seconds() -> float:
    """Seconds between two progress lines in a log, from MEGADOC_PROGRESS_SECONDS."""
    value = os.environ.get(SECONDS_VARIABLE, "").strip()
    try:
        seconds = float(value) if value else DEFAULT_SECONDS
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise InputError(f"{SECONDS_VARIABLE}={value!r} is not a number of seconds",
                         fix=f"e.g. {SECONDS_VARIABLE}=60; 0 prints a line at every update")
    return seconds


def duration(seconds: float) -> str:
    """As tqdm writes it: 00:42, 12:03, 1:02:05."""
    from tqdm import tqdm

    return tqdm.format_interval(seconds)


def amount(value: float) -> str:
    """As tqdm writes scaled numbers: 950, 4.19k, 10.5M."""
    from tqdm import tqdm

    return tqdm.format_sizeof(value)


class Progress:
    """`update(n)` as work is done, `close()` (or a `with` block) at the end. `scale`: counts as
    4.19M rather than 4,190,000 (bytes, tokens). `enabled=False` prints nothing at all."""

    def __init__(self, description: str, total: float, unit: str, scale: bool = False, enabled: bool = True,
                 stream=None, clock=time.monotonic):
        self.description, self.total, self.unit, self.scale = description, total, unit, scale
        self.stream, self.clock = stream or sys.stderr, clock
        self.enabled, self.done, self.note = enabled, 0, ""
        self.started = self.printed = clock()
        self.bar = self._terminal_bar() if enabled and self.stream.isatty() else None
        self.seconds = line_seconds() if enabled and self.bar is None else 0.0

    def _terminal_bar(self):
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no monitor thread: a worker pool forked later forks a single-threaded process
        return tqdm(total=self.total, unit=self.unit, unit_scale=self.scale, desc=self.description,
                    file=self.stream, dynamic_ncols=True)

    def update(self, count: float = 1, note: str | None = None) -> None:
        """`count` more units done; `note` (say other rates) is shown after the numbers from now on."""
        self.done += count
        if note is not None:
            self.note = note
        if self.bar is not None:
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(count)
        elif self.enabled and self.clock() - self.printed >= self.seconds:
            self._print(self.line())

    def line(self) -> str:
        elapsed = self.clock() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate else None
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (f"{self.description}: {self._count(self.done)} of {self._count(self.total)} {self.unit}{share}, "
                f"{amount(rate)} {self.unit}/s, elapsed {duration(elapsed)}, "
                f"ETA {'?' if left is None else duration(left)}{self._note()}")

    def last_line(self) -> str:
        elapsed = self.clock() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return (f"{self.description}: done, {self._count(self.done)} {self.unit} in {duration(elapsed)}, "
                f"{amount(rate)} {self.unit}/s{self._note()}")

    def _count(self, value: float) -> str:
        return amount(value) if self.scale and value >= 1000 else f"{value:,}"

    def _note(self) -> str:
        return f" ({self.note})" if self.note else ""

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
        self.printed = self.clock()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._print(self.last_line())
        self.enabled, self.bar = False, None  # closing twice prints once

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.close()
        elif self.bar is not None:  # failed: no "done" line
            self.bar.close()
