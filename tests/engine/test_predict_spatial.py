"""`lrss-ds predict --spatial N`: one scene over N ranks gives the one-rank map, rows gathered on the
accelerator's device, and settings that cannot split refused in one line naming ``--spatial``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
import torch.distributed as dist
from torch import nn

from lrss_ds.cli import main
from lrss_ds.data.rasters import RasterSource, open_store_scene
from lrss_ds.engine import comm
from lrss_ds.engine.demo import launcher_env
from lrss_ds.engine.inference import Predictor
from lrss_ds.engine.model_io import WEIGHTS_FORMAT
from lrss_ds.engine.rendezvous import free_port
from lrss_ds.engine.spatial_predict import SpatialPredictor, check_spatial, start_spatial_prediction
from lrss_ds.errors import LrssError
from lrss_ds.models import build_model
import lrss_ds.parallel.banded_front as banded_front
from lrss_ds.parallel import SpatialBatchNorm2d, SpatialGroup, spatialize
from tests.engine.test_engine_devices import (  # noqa: F401 - recording: the fixture
    Reached,
    RecordingDist,
    StandInAccelerator,
    recording,
)
from tests.engine.test_predict_helpers import DATASET, REPO, PointNet, one_line_error, write_geotiff
from tests.parallel.test_parallel_comm import RecordingP2P
from tests.parallel.threads import run_threads

MEAN, STD = [90.0, 100.0, 110.0], [40.0, 45.0, 50.0]
NODATA = 0
# EHSNet at tiny widths (LRD 7/15/31 depth-wise kernels, ECR): every cross-row operation the spatial layers have
EHSNET = dict(name="ehsnet", num_classes=4, in_channels=3, output_stride=8, lrd_k=8, lrd_d=8)


def _model(config: dict[str, Any]) -> nn.Module:
    """A fresh model with random BatchNorm running statistics and affine terms, in eval mode.

    Random running statistics: a spatial BatchNorm that normalised with the band's own statistics
    in eval mode would then give other logits than one rank.
    """
    torch.manual_seed(0)
    model = build_model(**config, band_mean=MEAN, band_std=STD)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.2, 0.2),
                                      (module.running_mean, -0.3, 0.3), (module.running_var, 0.5, 2.0)):
                tensor.data.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model.eval()


def _weights(path: Path, config: dict[str, Any]) -> Path:
    """An exported weights file of ``_model(config)`` (what `lrss-ds export` writes)."""
    model = _model(config)
    torch.save({"format": WEIGHTS_FORMAT, "model": model.config(), "dataset": DATASET, "input_dtype": "uint8",
                "band_mean": MEAN, "band_std": STD, "iteration": 0, "metrics": {},
                "state_dict": model.state_dict()}, path)
    return path


def _image(height: int, width: int) -> np.ndarray:
    """An odd-sized uint8 scene whose top-left block is nodata in every band."""
    image = np.random.default_rng(3).integers(1, 255, size=(3, height, width)).astype("uint8")
    image[:, :9, :13] = NODATA
    image[1, 5, 5] = 7  # one band valid: not nodata
    return image


def _stack(strips: list[tuple[int, np.ndarray, np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray]:
    assert [row for row, _, _ in strips] == sorted(row for row, _, _ in strips)
    return np.concatenate([c for _, c, _ in strips]), np.concatenate([p for _, _, p in strips], axis=1)


def _assert_same_prediction(classes: np.ndarray, probs: np.ndarray, ref_classes: np.ndarray,
                            ref_probs: np.ndarray, atol: float = 1e-4, rtol: float = 0.0) -> None:
    nodata = ref_classes == 255
    assert nodata.sum() == 9 * 13 - 1  # the masked block, as one rank masks it
    assert (classes == ref_classes).mean() >= 0.9999
    assert (classes[nodata] == 255).all() and not (classes[~nodata] == 255).any()
    np.testing.assert_allclose(probs, ref_probs, atol=atol, rtol=rtol)  # NaN where nodata, in both


# ------------------------------------------------------------------------------ equal to one rank


@pytest.mark.parametrize("config, bands", [
    (EHSNET, [(0, 128), (128, 157)]),  # total stride 64 at output stride 8
    (dict(name="hrnet_fcn", num_classes=4, in_channels=3), [(0, 96), (96, 157)]),  # total stride 32
], ids=["ehsnet", "hrnet_fcn"])
@pytest.mark.parametrize("small", [False, True], ids=["one_front_band", "many_front_bands"])
def test_two_thread_ranks_give_the_one_rank_rows(config: dict[str, Any], bands: list[tuple[int, int]], small: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # 157 rows in 32-row chunks: the band boundary inside the upsampling's reach, and the
    # bottom band padded at the scene's edge; small bands of each rank's front cross many
    # front-band boundaries within a rank's band
    if small:
        for name, rows in (("FRONT_BAND_ROWS", 32), ("BAND_ROWS", 8), ("STEM_BAND_ROWS", 8)):
            monkeypatch.setattr(banded_front, name, rows)
    model = _model(config)
    source = RasterSource.from_array(_image(157, 131), "scene", nodata=NODATA)
    ref_classes, ref_probs = _stack(list(Predictor(model=copy.deepcopy(model), num_classes=4).strips(
        source, probabilities=True)))
    models = [copy.deepcopy(model) for _ in range(2)]
    topology = SimpleNamespace(data=1, get_data_parallel_rank=lambda: 0)
    reads: list[tuple[int, int]] = []  # (first row, rows) of every window read, by either rank
    whole_scene = source.reader
    source.reader = lambda row, col, height, width: reads.append((row, height)) or whole_scene(row, col, height, width)

    def rank(index: int, thread_comm: Any) -> Any:
        group = SpatialGroup(thread_comm, index, 2)
        spatialize(models[index], group)
        predictor = SpatialPredictor(models[index], 4, 255, group, topology)  # type: ignore[arg-type]
        assert predictor.bands(source) == bands
        if predictor.writes:
            return list(predictor.strips(source, probabilities=True))
        predictor.send(source, probabilities=True)
        return None

    classes, probs = _stack(run_threads(2, rank)[0])
    _assert_same_prediction(classes, probs, ref_classes, ref_probs)
    assert sorted(reads) == [(start, stop - start) for start, stop in bands]  # each rank read its band only


def test_a_tile_store_scene_is_read_band_by_band_and_predicted_as_on_one_rank(tmp_path: Path) -> None:
    from tests.engine.test_predict_evaluate import _make_store

    image = _image(70, 90)
    _make_store(tmp_path / "store", {"s0": (image, np.zeros(image.shape[1:], np.uint8))})
    source = open_store_scene(tmp_path / "store", "s0")
    model = _model(dict(name="hrnet_fcn", num_classes=4, in_channels=3))
    ref_classes, ref_probs = _stack(list(Predictor(model=copy.deepcopy(model), num_classes=4).strips(
        source, probabilities=True)))
    models = [copy.deepcopy(model) for _ in range(2)]
    topology = SimpleNamespace(data=1, get_data_parallel_rank=lambda: 0)

    def rank(index: int, thread_comm: Any) -> Any:
        group = SpatialGroup(thread_comm, index, 2)
        spatialize(models[index], group)
        predictor = SpatialPredictor(models[index], 4, 255, group, topology)  # type: ignore[arg-type]
        assert predictor.bands(source) == [(0, 64), (64, 70)]
        if predictor.writes:
            return list(predictor.strips(source, probabilities=True))
        predictor.send(source, probabilities=True)
        return None

    classes, probs = _stack(run_threads(2, rank)[0])
    assert (classes == ref_classes).all()  # the store scene has no nodata value: nothing masked
    np.testing.assert_allclose(probs, ref_probs, atol=1e-4, rtol=0)


def test_scenes_are_shared_over_the_copies_and_a_group_shares_its_scenes() -> None:
    items = list(range(7))
    predictors = [_host_predictor(rank % 2) for rank in range(4)]  # 2 copies of a 2-rank group
    for rank, predictor in enumerate(predictors):
        predictor.topology = SimpleNamespace(data=2, get_data_parallel_rank=lambda rank=rank: rank // 2)
    assert [p.share(items) for p in predictors] == [[0, 2, 4, 6], [0, 2, 4, 6], [1, 3, 5], [1, 3, 5]]
    assert [p.writes for p in predictors] == [True, False, True, False]


def test_eval_spatial_batchnorm_normalises_with_running_statistics_without_communicating() -> None:
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(1, 3, 8, 5)
    # comm=None: any collective would fail; batch statistics would differ from the running ones
    spatial = SpatialBatchNorm2d.from_batchnorm(bn, SpatialGroup(None, 0, 2))  # type: ignore[arg-type]
    with torch.no_grad():
        torch.testing.assert_close(spatial(x), bn(x), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.launcher
def test_two_ranks_under_the_deepspeed_launcher_write_the_one_rank_maps(tmp_path: Path) -> None:
    weights = _weights(tmp_path / "w.pt", EHSNET)
    # bands of 128 and 29 rows, and of 64 and 6 (the network's total stride is 64): two scenes
    # one after the other through the same group
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    sizes = {"tall": (157, 131), "short": (70, 90)}
    for name, (height, width) in sizes.items():
        write_geotiff(scenes / f"{name}.tif", _image(height, width), nodata=NODATA)
    one, spatial = tmp_path / "one", tmp_path / "spatial"
    assert main(["predict", "--checkpoint", str(weights), "--input", str(scenes), "--output", str(one / "maps"),
                 "--probabilities", str(one / "probs")]) == 0
    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
               "--log_level", "warning", "--module", "lrss_ds.cli", "predict", "--spatial", "2",
               "--checkpoint", str(weights), "--input", str(scenes), "--output", str(spatial / "maps"),
               "--probabilities", str(spatial / "probs")]
    env = {**launcher_env(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sum("wrote " in line for line in done.stdout.splitlines()) == 2, done.stdout  # one writer per scene
    assert sorted(p.name for p in (spatial / "maps").iterdir()) == ["predictions.json", "short.tif", "tall.tif"]
    records = json.loads((spatial / "maps" / "predictions.json").read_text())["scenes"]
    assert [(r["scene"], r["rank"], r["spatial"], r["size"]) for r in records] == [
        ("short", 0, 2, [70, 90]), ("tall", 0, 2, [157, 131])]
    for record in records:
        peaks = record["peak_rss_gib_per_rank"]  # the writer's over writing, the other's over sending
        assert len(peaks) == 2 and peaks[0] == record["peak_rss_gib"] and peaks[1] > 0
    for name in sizes:
        with rasterio.open(one / "maps" / f"{name}.tif") as ref, \
                rasterio.open(spatial / "maps" / f"{name}.tif") as out:
            assert (out.profile["crs"], out.transform, out.nodata) == (ref.profile["crs"], ref.transform, ref.nodata)
            assert out.colormap(1) == ref.colormap(1) and out.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            classes, ref_classes = out.read(1), ref.read(1)
        with rasterio.open(one / "probs" / f"{name}.tif") as ref:
            ref_probs = ref.read()
        with rasterio.open(spatial / "probs" / f"{name}.tif") as out:
            probs = out.read()
        # both files hold float16: a float32 difference of 1e-7 can round to neighbouring halves
        # (one float16 step is 2^-11 of the value), so each pixel may differ by that step as well
        _assert_same_prediction(classes, probs, ref_classes, ref_probs, rtol=2.0**-10)
        assert (probs == ref_probs)[:, ref_classes != 255].mean() > 0.99


@pytest.mark.slow
@pytest.mark.launcher
def test_four_ranks_are_two_copies_of_a_two_rank_group(tmp_path: Path) -> None:
    weights = _weights(tmp_path / "w.pt", dict(name="hrnet_fcn", num_classes=4, in_channels=3))
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for index, size in enumerate([(157, 131), (70, 90), (100, 64)]):
        write_geotiff(scenes / f"s{index}.tif", _image(*size), nodata=NODATA)
    one = ["predict", "--checkpoint", str(weights), "--input", str(scenes), "--output", str(tmp_path / "one")]
    assert main(one) == 0
    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "4", "--master_port", str(free_port()),
               "--log_level", "warning", "--module", "lrss_ds.cli", "predict", "--spatial", "2",
               "--checkpoint", str(weights), "--input", str(scenes), "--output", str(tmp_path / "four")]
    env = {**launcher_env(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = json.loads((tmp_path / "four" / "predictions.json").read_text())["scenes"]
    # group 0 (ranks 0, 1) takes scenes 0 and 2, group 1 (ranks 2, 3) scene 1; each group's first rank writes
    assert {r["scene"]: r["rank"] for r in records} == {"s0": 0, "s1": 2, "s2": 0}
    for record in records:
        with rasterio.open(tmp_path / "one" / f"{record['scene']}.tif") as ref, \
                rasterio.open(tmp_path / "four" / f"{record['scene']}.tif") as out:
            assert (out.read(1) == ref.read(1)).mean() >= 0.9999


# ------------------------------------------------------------------------------ the accelerator's device


@pytest.fixture
def p2p(monkeypatch: pytest.MonkeyPatch) -> RecordingP2P:
    """Point-to-point of a 2-rank group whose backend serves only the (stand-in) accelerator's ``meta`` device."""
    import deepspeed.accelerator

    recorder = RecordingP2P("meta")
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: StandInAccelerator("meta"))
    monkeypatch.setattr(dist, "batch_isend_irecv", recorder)
    # the real P2POp resolves its peer in the default process group, which this process has not opened
    monkeypatch.setattr(dist, "P2POp", lambda op, tensor, group=None, group_peer=None: SimpleNamespace(
        op=op, tensor=tensor, group=group, group_peer=group_peer))
    return recorder


def _host_predictor(rank: int) -> SpatialPredictor:
    """A rank of a 2-rank spatial group over ``lrss_ds.engine.comm``, its model a stand-in of stride 8."""
    model = SimpleNamespace(pad_multiple=8)
    group = SpatialGroup(comm, rank, 2)
    return SpatialPredictor(model, 4, 255, group, SimpleNamespace())  # type: ignore[arg-type]


SOURCE = RasterSource.from_array(np.ones((3, 40, 6), dtype="uint8"), "scene")


def test_a_band_sends_its_rows_to_the_writer_on_the_accelerator(p2p: RecordingP2P) -> None:
    predictor = _host_predictor(1)
    # host rows, as the band's strips are
    predictor._band_strips = lambda *_: iter([(16, np.zeros((8, 6), np.uint8), None)])  # type: ignore[method-assign]
    with pytest.raises(Reached):
        predictor.send(SOURCE)
    assert p2p.calls == [("isend", 0, "meta")]


def test_the_writer_receives_the_other_bands_on_the_accelerator(p2p: RecordingP2P) -> None:
    predictor = _host_predictor(0)
    predictor._band_strips = lambda *_: iter([])  # type: ignore[method-assign]
    with pytest.raises(Reached):
        list(predictor.strips(SOURCE, probabilities=True))
    assert p2p.calls == [("irecv", 1, "meta")]


class _Logits(nn.Module):
    """A model's eval output with deferred upsampling: fixed logits of a 16-row band at stride 8."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return {"logits": self.logits, "padded_size": (16, 8)}


def test_the_logit_halo_is_exchanged_on_the_accelerator(p2p: RecordingP2P) -> None:
    predictor = _host_predictor(0)
    predictor.group.rows = [16, 24]  # what the forward's first collective would have set
    logits = torch.zeros(1, 4, 2, 1)  # host logits at stride 8 of a 16-row band
    predictor.model = _Logits(logits).eval()
    with pytest.raises(Reached):
        predictor._band_logits(np.zeros((3, 16, 6), np.uint8))
    assert p2p.calls == [("isend", 1, "meta"), ("irecv", 1, "meta")]


def test_the_ranks_peaks_are_reduced_on_the_accelerator(recording: RecordingDist) -> None:
    with pytest.raises(Reached):
        _host_predictor(1).peaks_per_rank(0.5)
    assert recording.calls == [("all_reduce", "meta")]


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("spatial, world, window, bf16, words", [
    (0, 1, None, False, "must be >= 1, got 0"),
    (2, 3, None, False, "2 does not divide the 3 ranks of the job"),
    (2, 2, 64, False, "sliding-window prediction (--window 64) does not split over ranks"),
    (2, 2, None, True, "bfloat16 has not been compared with one rank"),
])
def test_settings_that_cannot_split_are_refused(spatial: int, world: int, window: int | None, bf16: bool,
                                                words: str) -> None:
    with pytest.raises(LrssError) as error:
        check_spatial(spatial, world, window, bf16)
    assert str(error.value).startswith("--spatial: ") and words in str(error.value) and "\n" not in str(error.value)


def test_one_rank_per_scene_checks_nothing_else() -> None:
    check_spatial(1, 3, 64, True)  # today's prediction: windows and bf16 as they are


def _start(model: nn.Module, height: int = 64) -> None:
    meta = {"model": {"num_classes": 4}, "dataset": DATASET}
    source = RasterSource.from_array(np.zeros((3, height, 8), np.uint8), "short", where="in/short.tif")
    start_spatial_prediction(2, model, meta, [source])  # refused before any process group is opened


@pytest.mark.parametrize("make, height, words", [
    (lambda: PointNet(4, 3), 64, "model 'pointnet' has no spatial version yet"),
    (lambda: build_model("hrnet_fcn", 4, 3, mode="patch", patch_size=64, overlap=16), 64, "mode 'patch'"),
    (lambda: build_model("hrnet_fcn", 4, 3), 31, "in/short.tif: a scene of 31 rows holds 1 bands of 32 rows"),
])
def test_models_and_scenes_that_cannot_split_are_refused(make: Any, height: int, words: str) -> None:
    with pytest.raises(LrssError) as error:
        _start(make(), height)
    message = str(error.value)
    assert message.startswith("--spatial: ") and words in message and "\n" not in message
    assert "use --spatial 1" in message or "fewer ranks" in message


def test_the_command_refuses_more_spatial_ranks_than_the_job_has(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    weights = _weights(tmp_path / "w.pt", dict(name="hrnet_fcn", num_classes=4, in_channels=3))
    scene = write_geotiff(tmp_path / "scene.tif", _image(64, 40))
    one_line_error(capsys, ["predict", "--spatial", "2", "--checkpoint", str(weights), "--input", str(scene),
                            "--output", str(tmp_path / "map.tif")], "--spatial: 2 does not divide the 1 ranks")
    assert not (tmp_path / "map.tif").exists()
