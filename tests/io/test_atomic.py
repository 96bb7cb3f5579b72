"""What a killed mt run left beside its outputs (SIGKILL or a power loss: no cleanup ran) is removed by the next run
writing into that folder; a live process's partial file is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: a read-only one for a user; for root (who writes through permissions)
    sysfs, which creates no files for anyone."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        Path("/sys/mt-probe").touch()
    except PermissionError:
        return Path("/sys")
    Path("/sys/mt-probe").unlink()
    pytest.skip("running as root with a writable /sys: no folder here refuses a new file")


@pytest.mark.parametrize("command", ["convert", "release"])
def test_an_unwritable_output_folder_is_one_line_before_any_work(command, tmp_path):
    from click.testing import CliRunner

    from mt.cli import main
    from mt.demo import build_tiny_llama

    src = build_tiny_llama(tmp_path / "tiny")
    folder = unwritable_folder(tmp_path)
    args = {"convert": ["convert", str(src), "-o", str(folder / "m.gguf")],
            "release": ["release", str(src), "-o", str(folder / "dist"), "--quants", "q8_0", "--no-verify"]}[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mt: error: cannot write in {folder}"), result.output
