"""Stopping on request: a signal (SLURM sends SIGUSR1 or SIGTERM before a time limit and on
preemption) or a wall-time budget ends training after the iteration in flight, with a checkpoint,
so that the job can requeue itself and resume exactly (Megatron-LM's --exit-signal-handler and
--exit-duration-in-mins)."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist


class Stop(NamedTuple):
    reason: str               # "signal" | "time budget"
    signal: str | None = None


def stop_cause(stop: Stop, duration_minutes: float) -> str:
    return f"on {stop.signal}" if stop.reason == "signal" else \
        f"on its time budget (exit.duration_minutes {duration_minutes:g})"


class StopRequests:
    """The configured signals only set a flag (the process keeps running whatever it was doing);
    after each iteration `agreed` tells every rank, through one all-reduce, whether any rank was
    signalled or ran out of time, so all of them stop at the same iteration."""

    def __init__(self, settings, started: float, clock=time.monotonic):
        self.signals = [signal.Signals[name] for name in settings.signals]
        self.deadline = started + 60 * settings.duration_minutes if settings.duration_minutes else None
        self.clock = clock
        self.received: signal.Signals | None = None
        self.owner = os.getpid()

    @property
    def watched(self) -> bool:
        return bool(self.signals) or self.deadline is not None

    @contextmanager
    def listening(self):
        """The flag-setting handlers for the length of a block, then the previous ones again."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        previous = {number: signal.signal(number, self._on_signal) for number in self.signals}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def _on_signal(self, number: int, frame) -> None:
        if os.getpid() != self.owner:  # a forked data-loader worker: the trainer decides when they end
            return
        if self.received is None:
            self.received = signal.Signals(number)
            os.write(2, f"received {self.received.name}: stopping after the iteration in flight, "
                        "with a checkpoint\n".encode())  # not print: a handler may interrupt another write

    @contextmanager
    def held(self):
        """Signals held back (delivered after the block) while it may start helper processes:
        megatron-core's checkpoint writer spawns one at the first save that lives on, and it keeps
        this mask, so a signal sent to the whole job (SLURM signals every process of a step) does
        not kill it before the stop's own save needs it."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals) if self.signals else None
        try:
            yield
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def agreed(self, device: torch.device) -> Stop | None:
        """Whether to stop now, the same answer on every rank (a collective: every rank calls it)."""
        if not self.watched:
            return None
        out_of_time = self.deadline is not None and self.clock() >= self.deadline
        flags = torch.tensor([self.received or 0, out_of_time], dtype=torch.int64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        number, out_of_time = flags.tolist()
        if number:
            return Stop("signal", signal.Signals(number).name)
        return Stop("time budget") if out_of_time else None
