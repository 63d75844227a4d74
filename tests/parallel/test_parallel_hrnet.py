"""HRNet-FCN split over 2 and 4 ranks gives the one-rank loss, logits, gradients and running statistics.

Ranks are threads of this process (the arithmetic and the order of collectives), processes on
gloo through ``torch.distributed`` (the real exchange), and processes started by the
``deepspeed`` launcher (the way users run it). Scenes are uneven: the bottom band is shorter
than the others and padded at the scene's edge.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from lrss_ds.engine.demo import free_port, launcher_env
from lrss_ds.parallel import SpatialGroup, band_bounds, spatialize
from tests.parallel.spatial_cases import Case, build, reference, scene, spatial_run, spawned
from tests.parallel.threads import run_threads

REPO = Path(__file__).resolve().parents[2]


def _errors(ranks: list[dict[str, Any]], ref: dict[str, Any]) -> dict[str, float]:
    """Largest differences to ``ref``: logits and buffers absolute, gradients relative to the largest one."""
    logits = torch.cat([r["logits"] for r in ranks], dim=2).double()
    scale = max(float(g.abs().max()) for g in ref["grads"].values())
    return {
        "logits": float((logits - ref["logits"].double()).abs().max()),
        "loss": max(abs(float(r["loss"]) - float(ref["loss"])) for r in ranks),
        "grads": max(
            float((r["grads"][n].double() - g.double()).abs().max()) / scale for r in ranks for n, g in ref["grads"].items()
        ),
        "buffers": max(
            float((r["buffers"][n].double() - b.double()).abs().max()) for r in ranks for n, b in ref["buffers"].items()
        ),
    }


def _assert_exact(ranks: list[dict[str, Any]], ref: dict[str, Any], tol: float = 1e-10) -> None:
    errors = _errors(ranks, ref)
    assert max(errors.values()) < tol, errors
    assert all(set(r["grads"]) == set(ref["grads"]) for r in ranks)


def _assert_within_rounding(ranks: list[dict[str, Any]], case: Case) -> None:
    """float32: no further from the float64 truth than a few times the one-rank float32 run is."""
    truth = reference(Case(**{**asdict(case), "dtype": "float64"}))
    spatial, one_rank = _errors(ranks, truth), _errors([reference(case)], truth)
    for key in spatial:
        assert spatial[key] <= 4 * one_rank[key] + 1e-6, (key, spatial, one_rank)


def test_four_thread_ranks_equal_one_rank_with_boundary_weights() -> None:
    case = Case(height=136, dtype="float64", loss="ehsnet")  # bands 64, 32, 32, 8 (+24 rows of padding)
    model = build(case)
    models = [copy.deepcopy(model) for _ in range(4)]
    ranks = run_threads(4, lambda rank, comm: spatial_run(rank, 4, case, comm, models[rank]))
    assert ranks[0]["rows"] == [64, 32, 32, 32]
    _assert_exact(ranks, reference(case))


@pytest.mark.slow
def test_two_thread_ranks_equal_one_rank_for_ehsnet_with_checkpointing() -> None:
    # LRD (7/15/31 depth-wise, 5x5 dense), ECR and BAE; bands 64 and 8 (+56 rows of padding);
    # 128 px wide so that the 1/64 branch of a band holds more than one value
    case = Case(height=72, width=128, dtype="float64", checkpoint=True, loss="ehsnet", model="ehsnet", output_stride=8)
    model = build(case)
    models = [copy.deepcopy(model) for _ in range(2)]
    ranks = run_threads(2, lambda rank, comm: spatial_run(rank, 2, case, comm, models[rank]))
    # measured: gradients 5e-10 of the largest, logits 9e-11 (float32 rounding would be ~1e-3)
    _assert_exact(ranks, reference(case), tol=1e-8)


def _read(out: Path, size: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(size)]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_rank_with_checkpointing(tmp_path: Path) -> None:
    case = Case(height=80, dtype="float64", checkpoint=True)  # bands 64 and 16 (+16 rows of padding)
    mp.spawn(spawned, args=(2, asdict(case), str(tmp_path)), nprocs=2)
    _assert_exact(_read(tmp_path, 2), reference(case))


@pytest.mark.slow
def test_two_ranks_under_the_deepspeed_launcher_in_float32(tmp_path: Path) -> None:
    # 4 ranks under the launcher take minutes on a shared 2-core machine; the thread test covers 4
    case = Case(height=80, dtype="float32", checkpoint=True, loss="ehsnet")
    command = [
        str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()), "--log_level", "warning",
        "--module", "tests.parallel.spatial_cases", "--case", json.dumps(asdict(case)), "--out", str(tmp_path),
    ]
    done = subprocess.run(command, env=launcher_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _assert_within_rounding(_read(tmp_path, 2), case)


def test_eval_logits_of_the_bands_are_the_one_rank_logits() -> None:
    # the eval forward upsamples band logits with row halos; alone, rows at a boundary differ by ~1e-2
    case = Case(height=80, dtype="float64")  # bands 64 and 16 (+16 rows of padding)
    model = build(case).eval()
    image, _ = scene(case)
    with torch.no_grad():
        truth = model(image)
    models = [copy.deepcopy(model) for _ in range(2)]

    def band_logits(rank: int, comm: Any) -> torch.Tensor:
        group = SpatialGroup(comm, rank, 2)
        spatialize(models[rank], group)
        start, stop = band_bounds(case.height, 2, models[rank].pad_multiple)[rank]
        with torch.no_grad():
            return models[rank](image[..., start:stop, :])

    logits = torch.cat(run_threads(2, band_logits), dim=2)
    assert logits.shape == truth.shape
    assert float((logits - truth).abs().max()) < 1e-10
