"""MagNet and FCtL: the refinement replaces the chosen points, scale grids, context geometry, training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import lrss_ds.models.magnet as magnet
from lrss_ds.errors import ConfigError
from lrss_ds.models import build_model
from lrss_ds.models.base import upsample_logits
from lrss_ds.models.fctl import context_window
from lrss_ds.models.glsnet import Tiling
from lrss_ds.models.magnet import replace_uncertain, uncertainty
from lrss_ds.models.multiscale import cut_window

BANDS = 4
MAGNET = {"crop_size": 64, "depth": 18, "fpn_width": 32}
FCTL = {"crop_size": 64, "depth": 18, "fpn_width": 32, "corr_width": 32, "key_width": 16}


def _build(name: str, classes: int = 3, seed: int = 0, **options: Any) -> Any:
    torch.manual_seed(seed)
    small = MAGNET if name == "magnet" else FCTL
    return build_model(name, classes, BANDS, band_mean=[100.0] * BANDS, band_std=[50.0] * BANDS,
                       **{**small, **options})


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=1)


def test_replace_uncertain_takes_exactly_the_points_uncertain_before_and_certain_after() -> None:
    """A certain coarse map with three ties: exactly those three points take the refined values."""
    prior = torch.zeros(1, 3, 5, 6)
    prior[:, 0] = 1.0  # class 0, certain everywhere ...
    ties = [(0, 1), (2, 4), (4, 0)]
    for r, c in ties:  # ... except three points split evenly between classes 0 and 1
        prior[0, :2, r, c] = 0.5
    refined = _probs(torch.randn(1, 3, 5, 6) * 0.1)
    refined[0, :, 2, 4] = torch.tensor([0.0, 0.0, 1.0])  # the refiner is sure of one of the ties
    merged, chosen = replace_uncertain(prior, refined, fraction=3 / 30, kernel=1)
    assert sorted(map(tuple, chosen[0, 0].nonzero().tolist())) == sorted(ties)
    assert torch.equal(merged[chosen.expand_as(merged)], refined[chosen.expand_as(refined)])
    assert torch.equal(merged[~chosen.expand_as(merged)], prior[~chosen.expand_as(prior)])
    # One point: the tie where the refiner is certain ranks first.
    _, one = replace_uncertain(prior, refined, fraction=1 / 30, kernel=1)
    assert one[0, 0].nonzero().tolist() == [[2, 4]]


def test_replace_uncertain_ranks_by_score_and_the_median_filter_drops_isolated_points() -> None:
    torch.manual_seed(0)
    prior, refined = _probs(torch.randn(2, 4, 7, 9)), _probs(torch.randn(2, 4, 7, 9) * 3)
    merged, chosen = replace_uncertain(prior, refined, fraction=0.3, kernel=1)
    score = (uncertainty(prior) * (1 - uncertainty(refined))).flatten(1)
    for i in range(2):
        picked = chosen[i].flatten()
        assert int(picked.sum()) == round(0.3 * 63)
        assert score[i][picked].min() >= score[i][~picked].max()
    assert torch.equal(merged, torch.where(chosen, refined, prior))
    # A lone uncertain point vanishes under a 3x3 median; a 3x3 block of them survives.
    prior = torch.zeros(1, 2, 9, 9)
    prior[:, 0] = 1.0
    prior[0, :, 1, 1] = 0.5
    prior[0, :, 5:8, 5:8] = 0.5
    refined = torch.zeros(1, 2, 9, 9)
    refined[:, 1] = 1.0
    _, chosen = replace_uncertain(prior, refined, fraction=1 / 81, kernel=3)
    row, col = chosen[0, 0].nonzero().tolist()[0]
    assert 5 <= row <= 7 and 5 <= col <= 7


def test_magnet_output_is_the_coarse_map_with_the_chosen_points_refined(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the model: each window replaces round(f h w) points, and the output is the merged map."""
    calls: list[dict[str, torch.Tensor]] = []

    def recording(prior: torch.Tensor, refined: torch.Tensor, fraction: float, kernel: int) -> Any:
        merged, chosen = replace_uncertain(prior, refined, fraction, kernel)
        calls.append({"prior": prior, "refined": refined, "merged": merged, "chosen": chosen})
        return merged, chosen

    monkeypatch.setattr(magnet, "replace_uncertain", recording)
    model = _build("magnet", refine_fraction=0.25, crop_batch=2)
    model.train()
    for child in model.children():  # the train-mode dict with eval-mode BatchNorm
        child.eval()
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, BANDS, 70, 90), dtype=torch.uint8))
    assert out["padded_size"] == (128, 128) and len(calls) == 2  # 2x2 crops of 64 in chunks of 2
    prob = out["logits"].exp()
    refined = out["aux"][-1].softmax(dim=1)  # the refiner's logits, stitched
    chosen = torch.cat([c["chosen"] for c in calls])
    merged = torch.cat([c["merged"] for c in calls])
    for index in range(4):
        r, c = divmod(index, 2)
        region = (slice(None), slice(None), slice(16 * r, 16 * r + 16), slice(16 * c, 16 * c + 16))
        assert int(chosen[index].sum()) == round(0.25 * 16 * 16)
        torch.testing.assert_close(prob[0][region[1:]], merged[index], atol=1e-6, rtol=1e-5)
        mask = chosen[index].expand(3, -1, -1)
        torch.testing.assert_close(prob[0][region[1:]][mask], refined[0][region[1:]][mask], atol=1e-6, rtol=1e-5)
    # the unchosen points are the coarse scale's map, untouched by the refiner
    prior = torch.cat([c["prior"] for c in calls])
    assert torch.equal(merged[~chosen.expand_as(merged)], prior[~chosen.expand_as(prior)])


def test_magnet_scale_grids_tile_the_image_coarse_to_fine() -> None:
    model = _build("magnet", num_scales=4)
    tiling = Tiling(5, 3, (64, 96), (320, 288))
    grids = model.scale_grids(tiling)
    assert [(g.rows, g.cols, g.crop) for g in grids] == [(2, 1, (256, 384)), (3, 2, (128, 192)), (5, 3, (64, 96))]
    assert model.coarse_size((320, 288)) == (64, 64)
    with pytest.raises(ConfigError, match="num_scales"):
        _build("magnet", num_scales=6)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        _build("magnet", classes=1)


def test_magnet_three_scales_odd_input_same_size_and_every_parameter_learns() -> None:
    model = _build("magnet", num_scales=3)
    x = torch.randint(0, 256, (1, BANDS, 45, 67), dtype=torch.uint8)
    out = model(x)
    assert len(out["aux"]) == 1 + 2 * 2
    torch.manual_seed(1)
    loss = sum((upsample_logits(m, out["padded_size"], out["input_size"]) * torch.randn(1, 3, 45, 67)).mean()
               for m in [out["logits"], *out["aux"]])
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead[:5]
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 3, 45, 67)


def test_cut_window_fills_outside_the_image_and_reports_the_image_part() -> None:
    x = torch.arange(1, 1 + 2 * 4 * 5, dtype=torch.int32).view(2, 4, 5)
    part, box = cut_window(x, (-2, 3, 5, 4))
    assert box == (2, 0, 5, 2) and part.shape == (2, 5, 4)
    assert torch.equal(part[:, 2:5, 0:2], x[:, 0:3, 3:5])
    assert int(part[:, :2].abs().sum()) == 0 and int(part[:, :, 2:].abs().sum()) == 0
    assert cut_window(x, (10, 10, 2, 2))[1][0] == cut_window(x, (10, 10, 2, 2))[1][2]  # wholly outside: empty


def test_fctl_contexts_are_centred_and_reach_exactly_their_extent() -> None:
    """A crop's logits see pixels of its large context outside its medium one, and nothing beyond."""
    assert context_window((64, 128, 64, 64), 2) == (32, 96, 128, 128)
    assert context_window((64, 128, 64, 64), 3) == (0, 64, 192, 192)
    model = _build("fctl").eval()
    for block in model.correlations:  # full-strength attention, so that a context's effect is large
        block.gamma.data.fill_(1.0)
        torch.nn.init.normal_(block.value.weight, std=1.0)
    torch.manual_seed(3)
    x = torch.randint(0, 256, (1, BANDS, 64, 320), dtype=torch.uint8)  # one row of five 64 px crops

    def first_crop(image: torch.Tensor) -> torch.Tensor:
        # network-resolution logits: the upsampled output blends neighbouring crops at their seam
        model.defer_upsampling = True
        with torch.no_grad():
            return model(image)["logits"][..., :16]

    base = first_crop(x)
    inside_large = x.clone()
    inside_large[:, :, 20:40, 104:124] = 255 - inside_large[:, :, 20:40, 104:124]  # medium ends at 96, large at 128
    beyond = x.clone()
    beyond[:, :, :, 130:] = 255 - beyond[:, :, :, 130:]
    assert not torch.equal(first_crop(inside_large), base)
    assert torch.equal(first_crop(beyond), base)


class _Scenes(torch.utils.data.Dataset):
    """Three odd-sized 4-band scenes with labels."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randint(0, 255, (BANDS, 70, 90), generator=g, dtype=torch.uint8),
                "label": torch.randint(0, 3, (70, 90), generator=g, dtype=torch.uint8), "scene": f"s{i}",
                "window": (0, 0, 70, 90)}


@pytest.mark.parametrize("name", ["magnet", "fctl"])
def test_trainer_runs_steps_with_stage_checkpointing(name: str, tmp_path: Path) -> None:
    """The trainer's loop, with the ``ckpt_stage`` memory mode's checkpointing, steps and lowers nothing to NaN."""
    from lrss_ds.engine.config import ExperimentConfig
    from lrss_ds.engine.setup import DistInfo
    from lrss_ds.engine.trainer import Run, train
    from lrss_ds.memory import MemoryMode, SavedTensorLedger, prepare_model
    from lrss_ds.models.losses import build_loss
    from tests.engine.test_engine_units import StandInEngine

    config = ExperimentConfig()
    config.train.iterations, config.train.output = 2, str(tmp_path)
    config.data.workers = 0
    model = _build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mode = MemoryMode(checkpointing="stage")
    runner = prepare_model(model, mode)
    run = Run(config=config, dist=DistInfo(0, 1, 0), out=tmp_path, engine=StandInEngine(model), loss_fn=build_loss(
        "ce", 3, 255), memory_mode=mode, ledger=SavedTensorLedger(), train_set=_Scenes(), val_set=None,
        meta={"model": model.config()}, class_names=["a", "b", "c"], num_classes=3, ignore_index=255)
    assert train(run, resume=False) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["iteration"] == 2 and all(h["loss"] == h["loss"] for h in metrics["history"])
    assert runner is not None and runner.seen >= model.checkpoint_plan("stage")  # every planned segment recomputed
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any("refiner" in k or "correlations" in k for k in changed)
