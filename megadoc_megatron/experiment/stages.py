"""Stages of an experiment: `megadoc` commands whose outputs are cached under a key.

A stage's key is the SHA-256 of what it runs (its command lines and the files it writes first),
with paths inside the work directory written relative to it (an upstream stage's folder name
carries that stage's key) and external inputs written as a fingerprint of their content. Same
settings and same inputs: same key, and a finished stage (its `stage.json` exists) is skipped.
A stage that was interrupted is rerun in its own folder, where `megadoc synth` and `megadoc
train` resume from what they had written. A lock file (experiment/lock.py, safe on NFS and Lustre)
lets concurrent runs (a sweep's SLURM jobs) share stages: the second waits for the first and then
finds the stage finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from megadoc_megatron.cli import RENAMED
from megadoc_megatron.errors import InputError, Interrupted
from megadoc_megatron.experiment.lock import held
from megadoc_megatron.files import content_digest, write_text_atomic

OUT = "{out}"  # the stage's own folder, in command lines and files


@dataclass(frozen=True)
class External:
    """An input from outside the work directory: keyed by its content, not its path."""
    path: str


def fingerprint(path) -> str:
    """SHA-256 of a file's whole content, or of a folder's files (each read once per version of it:
    files.content_digest)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else ''}\0{content_digest(file)}\0".encode())
    return digest.hexdigest()


@dataclass
class Stage:
    name: str                                   # e.g. "train-stitch_g8"
    commands: list[list]                        # `megadoc` argv lists (str, External or containing OUT)
    files: dict[str, str] = field(default_factory=dict)  # written into the folder before the commands
    launcher: str = ""                          # what starts Python, e.g. torchrun ("": run in this process);
                                                # not part of the key
    after: list[str] = field(default_factory=list)  # stages that must finish first although their folders
                                                # are not in its commands (not part of the key)
    folder: Path | None = None                  # set by Graph.add

    def argv(self, command: list) -> list[str]:
        return [str(item.path) if isinstance(item, External) else str(item).replace(OUT, str(self.folder))
                for item in command]

    def full_command(self, command: list) -> list[str]:
        python = shlex.split(self.launcher) if self.launcher else [sys.executable]
        return [*python, "-m", "megadoc_megatron.cli", *self.argv(command)]

    @property
    def done(self) -> bool:
        return (self.folder / "stage.json").is_file()


def spelled_as_keyed(command: list) -> list:
    """The command with its flags spelled as before cli.RENAMED: keys stay those of work folders made
    before the renames, whose finished stages are kept."""
    renamed = RENAMED.get(" ".join(map(str, command[:2]))) or RENAMED.get(str(command[0]), {})
    old_spelling = {new: old for old, new in renamed.items()}
    return [old_spelling.get(item, item) if isinstance(item, str) else item for item in command]


class Graph:
    """The stages of one experiment, in the order they run."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self.stages: list[Stage] = []
        self._fingerprints: dict[str, str] = {}

    def _canonical(self, item) -> str:
        if isinstance(item, External):
            if item.path not in self._fingerprints:
                self._fingerprints[item.path] = fingerprint(item.path)
            return f"@content:{self._fingerprints[item.path]}"
        return str(item).replace(str(self.work_dir), "@work")

    def key(self, stage: Stage) -> str:
        text = json.dumps({"commands": [[self._canonical(i) for i in spelled_as_keyed(c)] for c in stage.commands],
                           "files": {k: self._canonical(v) for k, v in sorted(stage.files.items())}})
        return hashlib.sha256(text.encode()).hexdigest()

    def add(self, stage: Stage) -> Stage:
        stage.folder = self.work_dir / "stages" / f"{stage.name}.{self.key(stage)[:12]}"
        self.stages.append(stage)
        return stage


LOCK = ".megadoc-lock"  # experiment/lock.py: safe on NFS and Lustre


@contextmanager
def stage_lock(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)

    def waiting(holder: dict | None):
        who = f"{holder['host']} pid {holder['pid']}" + (f" (job {holder['job']})" if holder.get("job") else "") \
            if holder else "another process"
        print(f"    waiting for {who}, working on {folder.name}", flush=True)

    with held(folder / LOCK, on_wait=waiting):
        yield


# Runs a command that Linux signals (SIGTERM) when the process that started it dies, even by SIGKILL:
# torchrun and srun then stop their workers, and no trainer is left writing into a stage folder that a
# rerun writes into too. The signal is set before exec and survives it.
_TIED = ("import ctypes, os, signal, sys\n"
         "ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
         "if os.getppid() != int(sys.argv[1]):\n"
         "    sys.exit('megadoc run ended before the stage started')\n"
         "os.execvp(sys.argv[2], sys.argv[2:])\n")


def tied_to_this_process(command: list[str]) -> list[str]:
    """`command`, stopped when this process dies (Linux; elsewhere as it is)."""
    return [sys.executable, "-c", _TIED, str(os.getpid()), *command] if sys.platform == "linux" else command


@contextmanager
def stop_signals_passed_on(process: subprocess.Popen, launcher: str):
    """While a launched stage runs, the signals that tell a stage to save and stop (a SLURM job's time
    limit: USR1; SIGTERM) reach it: srun passes USR1 on to every rank; torchrun stops its workers only on
    SIGTERM, so anything but srun gets SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    srun = os.path.basename(shlex.split(launcher)[0]) == "srun"

    def pass_on(number, frame):
        if process.poll() is None:
            process.send_signal(number if srun else signal.SIGTERM)

    previous = {number: signal.signal(number, pass_on) for number in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _run_launched(command: list[str], launcher: str, log) -> int:
    """Run a command under its launcher, its output going to the console and the stage's log; it does not
    outlive this process (see tied_to_this_process), and it gets the stop signals this process gets."""
    process = subprocess.Popen(tied_to_this_process(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with stop_signals_passed_on(process, launcher):
            for line in iter(process.stdout.readline, b""):
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line.decode(errors="replace"))
            log.flush()
            return process.wait()
    finally:  # interrupted (Ctrl-C, an error): the stage stops with us
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def isatty(self) -> bool:  # progress: plain lines every MEGADOC_PROGRESS_SECONDS, as in a batch job
        return False


def _run_in_process(argv: list[str], log) -> int:
    """Run `megadoc ARGV` in this process (megatron-core and torch are imported once for the whole
    run, ~10 s saved per stage on CPU); its output goes to the console and the stage's log."""
    from megadoc_megatron.cli import main

    stdout, stderr, excepthook = sys.stdout, sys.stderr, sys.excepthook
    sys.stdout, sys.stderr = _Tee(stdout, log), _Tee(stderr, log)
    try:
        return main(argv)
    except SystemExit as exit:  # argparse; the commands were checked before the run, so rare
        return exit.code if isinstance(exit.code, int) else 1
    except Exception:
        traceback.print_exc()
        return 1
    finally:  # torch.distributed.init_process_group wraps the excepthook, once per stage
        sys.stdout, sys.stderr, sys.excepthook = stdout, stderr, excepthook


def _run_commands(stage: Stage, log_name: str) -> None:
    with open(stage.folder / log_name, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
        for command in stage.commands:
            shown = stage.full_command(command) if stage.launcher else ["megadoc", *stage.argv(command)]
            log.write(f"$ {shlex.join(shown)}\n")
            log.flush()
            code = (_run_launched(stage.full_command(command), stage.launcher, log) if stage.launcher
                    else _run_in_process(stage.argv(command), log))
            if code == Interrupted.exit_status:
                raise Interrupted(f"stage {stage.name} stopped to resume: `megadoc {command[0]}` saved what it had "
                                  "done", stage.folder / log_name, fix="run again: the stage resumes from its files")
            if code != 0:
                raise InputError(f"stage {stage.name} failed: `megadoc {command[0]}` exited with status {code}",
                                 stage.folder / log_name,
                                 fix="read the error above; after fixing it, rerun: finished stages are kept")


def run_array_task(stage: Stage, task: str) -> None:
    """One task of a stage that runs as a SLURM array (synthesis: each task takes its share of the shards);
    no lock and no completion record: the stage's own job, after the array, marks it done."""
    stage.folder.mkdir(parents=True, exist_ok=True)
    _run_commands(stage, f"log.task-{task}.txt")


def run_stage(stage: Stage) -> str:
    """Run a stage unless it is done; 'cached' or 'ran'. A failing command raises InputError."""
    with stage_lock(stage.folder):
        if stage.done:
            return "cached"
        start = time.time()
        for name, text in stage.files.items():
            target = stage.folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(target, text.replace(OUT, str(stage.folder)))
        _run_commands(stage, "log.txt")
        record = {"name": stage.name, "commands": [shlex.join(stage.argv(c)) for c in stage.commands],
                  "seconds": round(time.time() - start, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_text_atomic(stage.folder / "stage.json", json.dumps(record, indent=2) + "\n")
        return "ran"


def point_link(link: Path, target: Path) -> None:
    """Make `link` a relative symbolic link to `target`, replacing any old one at once."""
    link.parent.mkdir(parents=True, exist_ok=True)
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    os.symlink(os.path.relpath(target, link.parent), temporary)
    os.replace(temporary, link)
