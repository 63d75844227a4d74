"""Faults around `lrss-ds predict`, `evaluate` and `export`: outputs that are inputs, leftovers of
killed runs, bad devices, full disks and read-only directories each end in one named line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lrss_ds.models
from lrss_ds.cli import main
from lrss_ds.engine.model_io import WEIGHTS_FORMAT
from tests.engine.test_predict_helpers import DATASET, REPO, PointNet, build_stand_in, one_line_error, write_geotiff

MEAN, STD = [90.0, 100.0, 110.0], [40.0, 45.0, 50.0]


@pytest.fixture(autouse=True)
def stand_in_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI builds models with lrss_ds.models.build_model; point it at the stand-ins."""
    monkeypatch.setattr(lrss_ds.models, "build_model", build_stand_in, raising=False)


def make_weights(path: Path, name: str = "pointnet") -> Path:
    """An exported weights file of a freshly initialised stand-in model (no training needed)."""
    config = {"name": name, "num_classes": 3, "in_channels": 3}
    model = build_stand_in(**config, band_mean=MEAN, band_std=STD)
    payload = {
        "format": WEIGHTS_FORMAT,
        "model": config,
        "dataset": DATASET,
        "input_dtype": "uint8",
        "band_mean": MEAN,
        "band_std": STD,
        "iteration": 1,
        "metrics": {},
        "state_dict": model.state_dict(),
    }
    torch.save(payload, path)
    return path


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    """A 3-band, 3-class pointwise stand-in as an exported weights file."""
    return make_weights(tmp_path / "weights.pt")


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(3, height, width)).astype("uint8")


# ------------------------------------------------------------------------------ output is an input


def test_output_that_is_the_input_is_refused_even_with_overwrite(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_geotiff(tmp_path / "x.tif", _image(20, 30))
    original = source.read_bytes()
    hard = tmp_path / "hard.tif"
    os.link(source, hard)
    soft = tmp_path / "soft.tif"
    soft.symlink_to(source)
    base = ["predict", "--checkpoint", str(weights), "--input", str(source), "--overwrite"]
    for output, how in ((source, "same path"), (hard, "hard link"), (soft, "symlink")):
        one_line_error(capsys, base + ["--output", str(output)], str(output), "is the input", how)
        assert source.read_bytes() == original
    # The probabilities may not land on the input either, and nothing else is written meanwhile.
    one_line_error(
        capsys, base + ["--output", str(tmp_path / "map.tif"), "--probabilities", str(hard)], "is the input"
    )
    assert source.read_bytes() == original and not (tmp_path / "map.tif").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.tif", "soft.tif", "weights.pt", "x.tif"]


def test_batch_writing_into_its_own_input_directory_is_refused(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    sources = [write_geotiff(scenes / f"{name}.tif", _image(16, 16, seed=i)) for i, name in enumerate("ab")]
    before = {p: p.read_bytes() for p in sources}
    linked = tmp_path / "linked"
    linked.symlink_to(scenes, target_is_directory=True)
    for pattern, output, how in (
        (scenes, scenes, "same path"), (f"{scenes}/*.tif", scenes, "same path"), (scenes, linked, "symlink")
    ):
        argv = ["predict", "--checkpoint", str(weights), "--input", str(pattern), "--output", str(output)]
        one_line_error(capsys, argv + ["--overwrite"], "a.tif", "is the input", how)
        assert {p: p.read_bytes() for p in sources} == before
    assert sorted(p.name for p in scenes.iterdir()) == ["a.tif", "b.tif"]
    # A different output directory is fine.
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(weights), "--input", str(scenes), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif", "predictions.json"]


# ------------------------------------------------------------------------------ leftovers


class _SlowPointNet(PointNet):
    """The pointwise stand-in, taking 0.2 s per forward and announcing the first in ``marker``."""

    marker: Path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.marker.touch()
        time.sleep(0.2)
        return super().forward(x)


def _slow_predict(marker: str, argv: list[str]) -> None:
    """Subprocess body: `lrss-ds predict` with :class:`_SlowPointNet`."""

    def build(name: str, **config: object) -> _SlowPointNet:
        model = _SlowPointNet(**config)  # type: ignore[arg-type]
        model.marker = Path(marker)
        return model

    lrss_ds.models.build_model = build
    sys.exit(main(argv))


def test_a_predict_stopped_by_sigterm_removes_its_temporaries(weights: Path, tmp_path: Path) -> None:
    source = write_geotiff(tmp_path / "x.tif", _image(64, 64))
    out_dir, marker = tmp_path / "out", tmp_path / "forward_started"
    argv = ["predict", "--checkpoint", str(weights), "--input", str(source), "--output", str(out_dir / "x.tif"),
            "--probabilities", str(out_dir / "x.probs.tif"), "--window", "8", "--overlap", "0"]
    code = ("import json, sys; from tests.engine.test_predict_faults import _slow_predict; "
            "_slow_predict(*json.loads(sys.argv[1]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps([str(marker), argv])], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "predict never reached its first forward"
            time.sleep(0.05)
        partial = sorted(p.name for p in out_dir.iterdir())
        assert partial == [f".x.part-{proc.pid}.tif", f".x.probs.part-{proc.pid}.tif"]  # mid-write
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated (SIGTERM)" in err, err
    assert list(out_dir.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_writers_are_removed_and_readers_skip_them(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dead = _dead_pid()
    stale = [out_dir / f".x.part-{dead}.tif", out_dir / f".x.tmp-{dead}.tif", out_dir / f".x.probs.part-{dead}.tif"]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out_dir / f".y.part-{sleeper.pid}.tif"  # another predict still writing here
        for path in stale + [live]:
            path.write_bytes(b"half a GeoTIFF")
        source = write_geotiff(tmp_path / "x.tif", _image(20, 30))
        argv = ["predict", "--checkpoint", str(weights), "--input", str(source), "--output", str(out_dir / "x.tif")]
        assert main(argv) == 0
        assert f"removed {stale[0]}" in capsys.readouterr().err
        assert sorted(out_dir.iterdir()) == [live, out_dir / "predictions.json", out_dir / "x.tif"]
        # Readers of a directory or a glob skip temporaries: evaluate scores x.tif alone.
        labels = tmp_path / "labels"
        labels.mkdir()
        write_geotiff(labels / "x.tif", np.zeros((1, 20, 30), dtype="uint8"))
        assert main(["evaluate", "--predictions", str(out_dir), "--labels", str(labels),
                     "--checkpoint", str(weights), "--output", str(tmp_path / "report")]) == 0
        report = json.loads((tmp_path / "report" / "metrics.json").read_text())
        assert [scene["scene"] for scene in report["scenes"]] == ["x"] and report["pixels"] == 20 * 30
        assert main(["predict", "--checkpoint", str(weights), "--input", f"{out_dir}/.*.tif",
                     "--output", str(tmp_path / "again")]) == 1
        assert "no input raster found" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------ small windows


def test_windows_smaller_than_the_model_minimum_warn(recwarn: pytest.WarningsRecorder) -> None:
    from lrss_ds.engine.inference import min_window, predictor_for
    from lrss_ds.models import EHSNet

    model = EHSNet(num_classes=3, in_channels=3)
    meta = {"model": {"name": "ehsnet", "num_classes": 3, "in_channels": 3}, "dataset": DATASET}
    minimum = min_window(model)
    assert minimum == model.pad_multiple >= model.output_stride > 1
    with pytest.warns(UserWarning, match=rf"--window 8x8 is smaller than ehsnet's minimum of {minimum} px"):
        predictor_for(model, meta, window=8)
    recwarn.clear()
    predictor_for(model, meta, window=minimum)
    predictor_for(model, meta, window=None)
    assert not [w for w in recwarn if "--window" in str(w.message)]


# ------------------------------------------------------------------------------ output faults


def test_export_to_a_full_disk_names_the_file_and_keeps_the_previous_one(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out" / "model.pt"
    output.parent.mkdir()
    output.write_bytes(b"the previous export")
    # A real ENOSPC: the temporary name (this process's PID) leads to /dev/full.
    (output.parent / f".model.tmp-{os.getpid()}.pt").symlink_to("/dev/full")
    argv = ["export", "--checkpoint", str(weights), "--output", str(output), "--overwrite"]
    one_line_error(capsys, argv, str(output), "the disk is full")
    assert output.read_bytes() == b"the previous export"
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.pt"]


def _refuse_writes_in(monkeypatch: pytest.MonkeyPatch, directory: Path, code: int) -> None:
    """Make ``directory`` behave read-only for this process: creating or deleting files there fails.

    Why a mock: the tests run as root, where ``chmod`` does not stop writes.
    """
    import builtins

    real_open, real_unlink = builtins.open, Path.unlink

    def refusing_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(m in mode for m in "wax+") and Path(file).parent == directory:
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    def refusing_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.parent == directory:
            raise OSError(code, os.strerror(code), str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(builtins, "open", refusing_open)
    monkeypatch.setattr(Path, "unlink", refusing_unlink)


@pytest.mark.parametrize("code, cause", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only")])
def test_export_into_a_read_only_directory_names_the_real_cause(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    code: int, cause: str,
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
    _refuse_writes_in(monkeypatch, locked, code)
    output = locked / "model.pt"
    one_line_error(capsys, ["export", "--checkpoint", str(weights), "--output", str(output)], str(output), cause)
    assert list(locked.iterdir()) == []


def test_output_names_of_the_wrong_kind_are_one_line_errors(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    one_line_error(
        capsys, ["export", "--checkpoint", str(weights), "--output", str(folder), "--overwrite"],
        str(folder), "is a directory",
    )
    assert folder.is_dir() and list(folder.iterdir()) == []
    report = tmp_path / "report.txt"
    report.write_text("not a directory")
    labels = write_geotiff(tmp_path / "label.tif", np.zeros((1, 8, 8), dtype="uint8"))
    one_line_error(
        capsys,
        ["evaluate", "--predictions", str(labels), "--labels", str(labels), "--checkpoint", str(weights),
         "--output", str(report), "--overwrite"],
        str(report), "is a file",
    )
    assert report.read_text() == "not a directory"


@pytest.mark.parametrize(
    "device, fragments",
    [("gpu0", ["unknown device 'gpu0'", "cpu, cuda"]), ("cuda:7", ["'cuda:7' asked", "--device cpu"])],
)
def test_unusable_devices_are_one_line_errors(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str, fragments: list[str]
) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    source = write_geotiff(tmp_path / "x.tif", _image(8, 8))
    for command in (
        ["predict", "--checkpoint", str(weights), "--input", str(source), "--output", str(tmp_path / "m.tif")],
        ["evaluate", "--checkpoint", str(weights), "--store", str(tmp_path / "no_store"), "--split", "val",
         "--output", str(tmp_path / "r")],
    ):
        one_line_error(capsys, command + ["--device", device], "--device", *fragments)
    assert not (tmp_path / "m.tif").exists() and not (tmp_path / "r").exists()
