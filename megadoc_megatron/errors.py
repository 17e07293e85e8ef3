"""The one error type for problems a user can fix in their input or flags."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: names the file (and line) and says how to fix it."""

    exit_status = 2

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
        return (InputError, (self.message, self.path, self.line, self.fix))


class Interrupted(InputError):
    """Stopped on purpose (a signal, a time budget) after saving what it had done: run it again to resume."""

    exit_status = 75  # EX_TEMPFAIL
