"""Stages on a shared work folder: the lock (safe on NFS/Lustre, real processes racing and killed) and
launched stages that die with `megadoc run`."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import REPO

from megadoc_megatron.experiment.lock import held, read_holder
from megadoc_megatron.experiment.stages import LOCK, stage_lock


def python(code: str, *args, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True, **options)


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_processes_racing_for_a_stage_take_turns(tmp_path):
    racers = [python("""
        import os, sys, time
        from pathlib import Path
        from megadoc_megatron.experiment.stages import stage_lock
        folder = Path(sys.argv[1])
        with stage_lock(folder):
            with open(folder / "turns", "a") as log:
                log.write(f"in {os.getpid()}\\n"); log.flush(); time.sleep(0.3); log.write(f"out {os.getpid()}\\n")
        """, tmp_path, stdout=subprocess.DEVNULL) for _ in range(3)]
    assert [racer.wait(timeout=120) for racer in racers] == [0, 0, 0]
    turns = [line.split() for line in (tmp_path / "turns").read_text().splitlines()]
    assert len(turns) == 6 and all(a[0] == "in" and b == ["out", a[1]] for a, b in zip(turns[::2], turns[1::2]))
    assert not (tmp_path / LOCK).exists()


def test_a_stage_lock_whose_holder_was_killed_is_taken_over(tmp_path):
    holder = python("""
        import sys, time
        from pathlib import Path
        from megadoc_megatron.experiment.stages import stage_lock
        with stage_lock(Path(sys.argv[1])):
            print("held", flush=True)
            time.sleep(1000)
        """, tmp_path, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "held"
    assert read_holder(tmp_path / LOCK)["pid"] == holder.pid
    holder.kill()
    holder.wait()
    with stage_lock(tmp_path):  # the holder ran on this host and its pid is gone: no waiting for a timeout
        assert read_holder(tmp_path / LOCK)["pid"] == os.getpid()


def test_a_lock_held_on_another_host_is_taken_over_only_once_its_heartbeat_stops(tmp_path):
    path = tmp_path / LOCK
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "job": "77"}) + "\n")
    beating, acquired = threading.Event(), threading.Event()
    beating.set()

    def heartbeat():
        while beating.is_set():
            os.utime(path)
            time.sleep(0.2)

    def waiter():
        with held(path, stale=2.0):
            acquired.set()

    threads = [threading.Thread(target=heartbeat), threading.Thread(target=waiter)]
    for thread in threads:
        thread.start()
    assert not acquired.wait(5)  # the holder's heartbeat moves: it is alive, whatever its host
    beating.clear()
    assert acquired.wait(60)
    for thread in threads:
        thread.join()


def test_a_launched_stage_dies_with_megadoc_run(tmp_path):
    """kill -9 of `megadoc run` while a stage runs under a launcher (torchrun, srun): the launched process
    gets SIGTERM and stops, so no orphan keeps writing into the stage folder."""
    sleeper = tmp_path / "launcher.py"
    sleeper.write_text("import os, sys, time\nfrom pathlib import Path\n"
                       "Path(sys.argv[-1]).write_text(str(os.getpid()))\ntime.sleep(1000)\n")
    child_pid = tmp_path / "child.pid"
    run = python("""
        import sys
        from pathlib import Path
        from megadoc_megatron.experiment.stages import Stage, run_stage
        stage = Stage("sleepy", [["inspect", sys.argv[3]]], launcher=f"{sys.executable} {sys.argv[2]}")
        stage.folder = Path(sys.argv[1])
        run_stage(stage)
        """, tmp_path / "stage", sleeper, child_pid, stdout=subprocess.DEVNULL)
    wait_for(child_pid.is_file)
    wait_for(lambda: child_pid.read_text().strip() != "")
    pid = int(child_pid.read_text())
    os.kill(run.pid, signal.SIGKILL)
    run.wait()

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return open(f"/proc/{pid}/stat").read().split()[2] == "Z"  # a zombie: dead, not yet reaped
    wait_for(gone, 30)
    with stage_lock(tmp_path / "stage"):  # and the stage can be taken up again at once
        pass


def test_status_tells_done_running_failed_and_waiting_stages(tmp_path, capsys):
    from megadoc_megatron.cli import main
    from megadoc_megatron.errors import InputError
    from megadoc_megatron.experiment.lock import held
    from megadoc_megatron.experiment.stages import OUT, Graph, Stage, run_stage
    from megadoc_megatron.experiment.status import read_status, write_plan

    assert main(["status", str(tmp_path)]) == 2 and "no plan in this work folder" in capsys.readouterr().err
    graph = Graph(tmp_path)
    data = graph.add(Stage("data", [], files={"data.txt": "x"}))
    train = graph.add(Stage("train", [["train", f"{data.folder}/data.txt"]]))
    graph.add(Stage("report", [["report", f"{train.folder}/ckpt", "--output-dir", OUT]]))
    broken = graph.add(Stage("broken", [["inspect", str(tmp_path / "missing")]]))
    write_plan(tmp_path, graph.stages)
    assert [s.state for s in read_status(tmp_path)] == ["to run", "waiting", "waiting", "to run"]
    run_stage(data)
    with pytest.raises(InputError, match="stage broken failed"):
        run_stage(broken)
    (train.folder / "ckpt").mkdir(parents=True)
    (train.folder / "ckpt/metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "loss": 5.0}) + "\n"
                                                             for i in (1, 2, 3)))
    (train.folder / "blend").mkdir()
    (train.folder / "blend/blend.json").write_text(json.dumps({"train_iters": 8}))
    with held(train.folder / LOCK):
        states = {s.name: s for s in read_status(tmp_path)}
        assert main(["status", str(tmp_path)]) == 0
    assert states["data"].state == "done" and states["report"].state == "waiting"
    assert states["report"].detail == "for train"
    assert states["train"].state == "running" and states["train"].detail.endswith(f"pid {os.getpid()}, iteration 3 "
                                                                                  "of 8")
    assert states["broken"].state == "failed" and "megadoc inspect: error:" in states["broken"].detail
    printed = capsys.readouterr().out
    assert "4 stages: 1 done, 1 running, 1 failed, 1 waiting" in printed
    assert read_status(tmp_path)[1].state == "to run"  # the lock let go: interrupted, to run again


def test_a_stage_key_covers_the_whole_content_of_a_large_input_hashed_once_per_version(tmp_path, monkeypatch):
    from megadoc_megatron.experiment.stages import fingerprint

    monkeypatch.setenv("MEGADOC_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "a line of the corpus"}\n' * (70 << 20 >> 5))  # 70 MiB
    first = fingerprint(corpus)
    assert fingerprint(corpus) == first and len(list((tmp_path / "cache/digests").iterdir())) == 1
    with open(corpus, "r+b") as stream:  # one byte in the middle, the size unchanged
        stream.seek(35 << 20)
        stream.write(b"A" if stream.read(1) != b"A" else b"B")
    assert fingerprint(corpus) != first and len(list((tmp_path / "cache/digests").iterdir())) == 2
