"""Tests for ConfusionMatrix against hand-computed counts and metrics."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lrss_ds.engine.metrics import ConfusionMatrix, jsonable
from lrss_ds.engine.rendezvous import free_port

# 8 pixels, one ignored (255). By hand, rows = target, columns = prediction:
#   t0: p0 p0 p1   -> [2, 1, 0]
#   t1: p1 p2      -> [0, 1, 1]
#   t2: p2 p0      -> [1, 0, 1]
TARGET = [0, 0, 0, 1, 1, 2, 255, 2]
PRED = [0, 0, 1, 1, 2, 2, 0, 0]
MATRIX = [[2, 1, 0], [0, 1, 1], [1, 0, 1]]


def test_matches_hand_computed_matrix_and_metrics() -> None:
    cm = ConfusionMatrix(3, ignore_index=255, class_names=["a", "b", "c"])
    cm.update(torch.tensor(PRED, dtype=torch.uint8), torch.tensor(TARGET, dtype=torch.uint8))
    out = cm.compute()
    assert out["matrix"] == MATRIX
    assert out["classes"] == ["a", "b", "c"]
    # TP = (2, 1, 1), FP = (1, 1, 1), FN = (1, 1, 1).
    assert out["iou"] == pytest.approx([2 / 4, 1 / 3, 1 / 3])
    assert out["precision"] == pytest.approx([2 / 3, 1 / 2, 1 / 2])
    assert out["recall"] == pytest.approx([2 / 3, 1 / 2, 1 / 2])
    assert out["f1"] == pytest.approx([2 / 3, 1 / 2, 1 / 2])
    assert out["miou"] == pytest.approx(7 / 18)
    assert out["mean_f1"] == pytest.approx(5 / 9)
    assert out["oa"] == pytest.approx(4 / 7)
    assert out["pixels"] == 7
    assert out["support"] == [3, 2, 2]


def test_numpy_and_torch_batches_accumulate_the_same() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(2, 33, 47)).astype(np.uint8)
    target[0, :3] = 255
    pred = rng.integers(0, 5, size=(2, 33, 47)).astype(np.int32)
    whole = ConfusionMatrix(5, 255)
    whole.update(pred, target)
    split = ConfusionMatrix(5, 255)
    split.update(torch.from_numpy(pred[0]), torch.from_numpy(target[0]))
    split.update(pred[1], target[1])
    keep = target != 255
    expected = np.zeros((5, 5), np.int64)
    np.add.at(expected, (target[keep].astype(int), pred[keep]), 1)
    assert whole.compute()["matrix"] == expected.tolist()
    assert split.compute()["matrix"] == expected.tolist()


def test_absent_class_is_nan_and_left_out_of_means() -> None:
    cm = ConfusionMatrix(4, ignore_index=None)
    # Class 3 is in neither; class 2 is in the target but never predicted.
    cm.update(np.array([0, 1, 1, 0]), np.array([0, 1, 2, 0]))
    out = cm.compute()
    assert math.isnan(out["iou"][3]) and math.isnan(out["f1"][3])
    assert out["f1"][2] == 0.0 and out["iou"][2] == 0.0
    assert math.isnan(out["precision"][2]) and out["recall"][2] == 0.0
    assert out["miou"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert out["mean_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    text = json.dumps(jsonable(out), allow_nan=False)
    assert json.loads(text)["iou"][3] is None


def test_out_of_range_classes_raise() -> None:
    cm = ConfusionMatrix(3, ignore_index=255)
    with pytest.raises(ValueError, match="target has class 7"):
        cm.update(np.array([0, 1]), np.array([0, 7]))
    with pytest.raises(ValueError, match="pred has class 3"):
        cm.update(np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.array([0, 1, 2]), np.array([0, 1]))
    assert cm.compute()["pixels"] == 0


def _reduce_worker(rank: int, port: int, queue: "mp.Queue") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(3, 255)
        half = slice(0, 4) if rank == 0 else slice(4, 8)
        cm.update(np.array(PRED[half]), np.array(TARGET[half]))
        queue.put((rank, cm.all_reduce().compute()["matrix"]))
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_sums_over_gloo_ranks() -> None:
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=_reduce_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results[0] == MATRIX and results[1] == MATRIX


def test_all_reduce_without_distributed_is_noop() -> None:
    cm = ConfusionMatrix(3, 255)
    cm.update(np.array(PRED), np.array(TARGET))
    assert cm.all_reduce().compute()["matrix"] == MATRIX
