"""The error type for problems a user can fix in their input or flags, and its kind for a run
stopped on purpose; each carries the exit status `megadoc` ends with."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: names the file (and line) and says how to fix it."""

    exit_status = 2  # argparse's status for a bad command line

    def __init__(self, message: str, path=None, line: int | None = None, fix: str | None = None):
        self.message, self.path, self.line, self.fix = message, path, line, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:{self.line}: " if self.line is not None else f"{self.path}: "
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{where}{self.message}.{fix}"

    def __reduce__(self):  # keep all fields when raised inside a worker process
        return (type(self), (self.message, self.path, self.line, self.fix))


class Interrupted(InputError):
    """Stopped on purpose (a signal, a time budget) with the work saved: running the same command
    again resumes it. A job script requeues itself on this status."""

    exit_status = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again
