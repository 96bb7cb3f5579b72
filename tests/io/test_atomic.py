"""What a killed mt run left beside its outputs (SIGKILL or a power loss: no cleanup ran) is removed by the next run
writing into that folder; a live process's partial file is left alone."""

from __future__ import annotations

import os
import subprocess
import sys

from mt.io.atomic import atomic_dir, atomic_path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_run_removes_what_dead_runs_left(tmp_path):
    pid = dead_pid()
    stale_file = tmp_path / f".model.gguf.mt-partial-{pid}"
    stale_file.write_bytes(b"half a file")
    stale_dir = tmp_path / f".dist.mt-partial-{pid}"
    (stale_dir / "sub").mkdir(parents=True)
    stale_old = tmp_path / f".dist.mt-old-{pid}"
    stale_old.mkdir()
    alive = tmp_path / f".other.gguf.mt-partial-{os.getppid()}"
    alive.write_bytes(b"a running process's file")
    unrelated = tmp_path / "notes.mt-partial-1.txt"
    unrelated.write_text("not ours")
    with atomic_path(tmp_path / "out.gguf") as tmp:
        tmp.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, unrelated.name, "out.gguf"])


def test_a_release_folder_run_removes_them_too(tmp_path):
    stale = tmp_path / f".x.gguf.mt-partial-{dead_pid()}"
    stale.write_bytes(b"x")
    with atomic_dir(tmp_path / "dist") as stage:
        (stage / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]
