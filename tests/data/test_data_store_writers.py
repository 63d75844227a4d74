"""Tests of store safety: one writer at a time (real processes), info --check, chunks on disk, full disk."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr.storage._local as zarr_local

from lrss_ds.cli import main
from lrss_ds.data import TileStore
from lrss_ds.data.ingest import ingest
from lrss_ds.data.store_format import PARTIAL_DIR
from lrss_ds.data.store_lock import LOCK_NAME
from lrss_ds.errors import StoreError
from tests.data.data_helpers import quiet, snapshot, synth_scenes

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120


@pytest.fixture()
def synth_dir(tmp_path: Path) -> Path:
    return synth_scenes(tmp_path, 3, "96x160")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# A real ingest that stops, holding the store, just before its first scene is marked complete,
# until the file GO exists: the race of two ingests made deterministic.
PAUSED_INGEST = """
import sys, time
from pathlib import Path
from lrss_ds.data import store_writer as store_mod
from lrss_ds.data.ingest import ingest
store, images, labels, ready, go = sys.argv[1:6]
original = store_mod.StoreWriter.finish_scene
def finish(self, scene, group, attrs):
    Path(ready).write_text(scene)
    while not Path(go).exists():
        time.sleep(0.02)
    original(self, scene, group, attrs)
store_mod.StoreWriter.finish_scene = finish
ingest(store, images, labels, "synthetic", tile=32, log=lambda s: None)
"""


def test_second_ingest_is_refused_naming_the_first_then_waits_with_wait(tmp_path, synth_dir, capsys) -> None:
    images, labels = str(synth_dir / "images"), str(synth_dir / "labels")
    clean = tmp_path / "clean.zarr"
    ingest(clean, images, labels, "synthetic", tile=32, log=quiet)
    store = tmp_path / "s.zarr"
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_INGEST, str(store), images, labels, str(ready), str(go)],
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(ready.exists, "the first ingest to write its first scene")
        partial = store / PARTIAL_DIR / ready.read_text()
        assert partial.is_dir()
        cli = [sys.executable, "-m", "lrss_ds.cli", "ingest", "--store", str(store), "--images", images,
               "--labels", labels, "--dataset", "synthetic", "--tile", "32"]
        second = subprocess.run(cli, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
        assert second.returncode == 1, second.stderr
        error = second.stderr.strip()
        assert "\n" not in error and "another ingest is writing to this store" in error
        assert f"pid {first.pid} " in error and "--wait" in error
        assert partial.is_dir()  # the second ingest left the first one's work alone
        assert main(["info", str(store)]) == 0
        shown = capsys.readouterr().out
        assert f"an ingest is writing to the store: pid {first.pid} " in shown
        assert f"incomplete scenes (being written): {partial.name}" in shown

        waiting_log = tmp_path / "waiting.log"
        with open(waiting_log, "w") as log:
            third = subprocess.Popen(cli + ["--wait"], env=_env(), stdout=subprocess.PIPE, stderr=log, text=True)
        _wait_for(lambda: "waiting for the writer lock" in waiting_log.read_text(), "the --wait ingest to wait")
        assert third.poll() is None
        go.write_text("")
        assert first.wait(TIMEOUT) == 0, first.stderr.read().decode()[-2000:]
        out, _ = third.communicate(timeout=TIMEOUT)
        assert third.returncode == 0, waiting_log.read_text()
        assert "0 scenes ingested, 3 already complete" in out
    finally:
        go.write_text("")
        first.kill()
        first.wait()
    assert not (store / LOCK_NAME).exists() and not (store / PARTIAL_DIR).exists()
    assert snapshot(store) == snapshot(clean)
    assert main(["info", "--check", str(store)]) == 0


def test_info_check_names_each_damaged_scene_and_ingest_repairs_them(tmp_path, synth_dir, capsys) -> None:
    images, labels = str(synth_dir / "images"), str(synth_dir / "labels")
    store = tmp_path / "s.zarr"
    ingest(store, images, labels, "synthetic", tile=32, log=quiet)
    reference = snapshot(store)
    assert main(["info", "--check", str(store)]) == 0
    assert "3 scenes intact, 0 damaged" in capsys.readouterr().out

    (store / "synth_0_0001" / "image" / "c" / "0" / "1" / "2").unlink()
    (store / "synth_0_0002" / "image" / "zarr.json").unlink()  # what made every later ingest fail with KeyError
    assert main(["info", "--check", str(store)]) == 1
    captured = capsys.readouterr()
    damaged = [line for line in captured.err.splitlines() if line.startswith("damaged")]
    assert len(damaged) == 2, captured.err
    assert "synth_0_0001: image chunk c/0/1/2 missing" in damaged[0]
    assert "synth_0_0002: image metadata missing" in damaged[1]
    assert "1 scenes intact, 2 damaged" in captured.out

    result = ingest(store, images, labels, "synthetic", tile=32, log=quiet)
    assert result["skipped"] == ["synth_0_0000"] and sorted(result["redone"]) == ["synth_0_0001", "synth_0_0002"]
    assert main(["info", "--check", str(store)]) == 0
    assert snapshot(store) == reference


def test_a_scene_with_a_chunk_lost_while_writing_is_not_marked_complete(tmp_path, synth_dir, monkeypatch) -> None:
    """A chunk file that vanishes before the scene is finished (as when another process deleted
    the scene's _partial directory) keeps the scene from being marked complete."""
    original = zarr_local._put

    def lose_one_chunk(path: Path, value, exclusive: bool = False) -> int:
        if str(path).endswith("synth_0_0001/image/c/0/1/2"):
            return len(value)  # "written", but nothing reaches the disk
        return original(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", lose_one_chunk)
    with pytest.raises(StoreError, match="chunk files missing after writing") as info:
        ingest(tmp_path / "s.zarr", str(synth_dir / "images"), str(synth_dir / "labels"), "synthetic", tile=32,
               log=quiet)
    assert "\n" not in str(info.value) and "synth_0_0001" in str(info.value)
    assert TileStore.open(tmp_path / "s.zarr").scenes() == ["synth_0_0000"]
    assert not (tmp_path / "s.zarr" / "synth_0_0001").exists() and not (tmp_path / "s.zarr" / PARTIAL_DIR).exists()


def test_full_disk_during_ingest_is_one_line_and_keeps_the_store_consistent(tmp_path, synth_dir, monkeypatch,
                                                                            capsys) -> None:
    images, labels = str(synth_dir / "images"), str(synth_dir / "labels")
    clean = tmp_path / "clean.zarr"
    ingest(clean, images, labels, "synthetic", tile=32, log=quiet)
    original = zarr_local._put
    writes = {"n": 0}

    def full_disk(path: Path, value, exclusive: bool = False) -> int:
        if "synth_0_0001" in str(path) and "/c/" in str(path):
            writes["n"] += 1
            if writes["n"] > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", full_disk)
    store = tmp_path / "s.zarr"
    command = ["ingest", "--store", str(store), "--images", images, "--labels", labels, "--dataset", "synthetic",
               "--tile", "32"]
    assert main(command) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("lrss-ds ingest: error: "), errors
    assert "disk full" in errors[0] and f"{store}/{PARTIAL_DIR}/synth_0_0001/" in errors[0]
    # Only the scene completed before the disk filled is in the store; nothing is left half-written.
    assert TileStore.open(store).scenes() == ["synth_0_0000"]
    assert sorted(p.name for p in store.iterdir()) == ["synth_0_0000", "zarr.json"]
    assert main(["info", "--check", str(store)]) == 0

    monkeypatch.setattr(zarr_local, "_put", original)  # space freed: the rerun completes the store
    assert main(command) == 0
    assert snapshot(store) == snapshot(clean)


def test_lock_file_of_a_killed_writer_does_not_block(tmp_path, synth_dir, capsys) -> None:
    """The kernel drops a dead writer's lock: its leftover lock file and _partial scene are taken over."""
    store = tmp_path / "s.zarr"
    images, labels = str(synth_dir / "images"), str(synth_dir / "labels")
    ready, go = tmp_path / "ready", tmp_path / "go"
    writer = subprocess.Popen([sys.executable, "-c", PAUSED_INGEST, str(store), images, labels, str(ready), str(go)],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(ready.exists, "the writer to start its first scene")
    finally:
        writer.kill()
        writer.wait()
    assert (store / LOCK_NAME).exists() and (store / PARTIAL_DIR).is_dir()
    assert main(["info", str(store)]) == 0
    shown = capsys.readouterr().out  # the dead writer's record is not shown as a live writer
    assert "an ingest is writing" not in shown and "incomplete scenes (interrupted ingest" in shown
    lines: list[str] = []
    result = ingest(store, images, labels, "synthetic", tile=32, log=lines.append)
    assert sorted(result["ingested"]) == ["synth_0_0000", "synth_0_0001", "synth_0_0002"]
    assert any("removed incomplete scene 'synth_0_0000'" in line for line in lines)
    assert not (store / LOCK_NAME).exists()
    assert main(["info", "--check", str(store)]) == 0
