"""Tests of ``lrss-ds models``: meta-device counting equals a real run, patch tiling, the CLI."""

from __future__ import annotations

import pytest
import torch

from lrss_ds.cli import main
from lrss_ds.models import MODEL_BUILDERS
from lrss_ds.models import listing
from lrss_ds.models.listing import model_cost, patch_count
from lrss_ds.models.smp_adapter import library_problem


@pytest.mark.parametrize(
    "name, options",
    [("ehsnet", {"lrd_k": 32, "lrd_d": 32, "dw_kernels": (3, 7)}), ("hrnet_fcn", {"mode": "downsampled", "downsample": 2})],
)
def test_meta_count_equals_real_run(name: str, options: dict) -> None:
    torch.manual_seed(0)
    meta = model_cost(name, 3, 4, (70, 100), device="meta", **options)
    real = model_cost(name, 3, 4, (70, 100), device="cpu", **options)
    assert meta.flops is not None and meta.flops > 0
    assert (meta.parameters, meta.flops) == (real.parameters, real.flops)


def test_patch_mode_counts_every_patch() -> None:
    assert patch_count((6800, 7200), (512, 512), 64) == 16 * 16  # 1 + ceil((6800 - 512) / 448) = 16, the same for 7200
    assert patch_count((300, 200), (512, 512), 64) == 1
    one = model_cost("hrnet_fcn", 2, 3, (64, 64), mode="holistic")
    tiled = model_cost("hrnet_fcn", 2, 3, (64 + 32, 64), mode="patch", patch_size=64, overlap=32)
    assert tiled.flops == 2 * one.flops


def test_cli_lists_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--size", "64x96", "--bands", "3", "--classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "64x96x3" in out
    rows = [line.split()[0] for line in out.splitlines()[2:]]
    assert set(rows) == set(MODEL_BUILDERS)
    # only a library model whose package cannot be imported here may lack figures, and it says why
    broken = {line.split()[0] for line in out.splitlines()[2:] if "n/a" in line}
    assert broken <= {name for name in ("smp", "tv_fcn") if library_problem(name)}, out
    assert all("needs" in line for line in out.splitlines()[2:] if "n/a" in line), out
    assert main(["models", "--size", "64by96"]) == 1
    assert "--size" in capsys.readouterr().err


def test_a_model_without_a_listing_row_is_listed_with_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(listing.MODEL_BUILDERS, "new_model", MODEL_BUILDERS["segnet"])
    rows = listing.listed_variants()
    assert rows[: len(listing.VARIANTS)] == listing.VARIANTS and rows[len(listing.VARIANTS):] == [("new_model", {})]
