"""memory_time's per-method options: larger budgets for slow methods, trainings merged from several runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import memory_time  # noqa: E402


def test_train_budget_for_sets_one_method(tmp_path: Path) -> None:
    args = memory_time.parse_args(["--quick", "--out", str(tmp_path), "--train-budget-for", "GLNet=1440"])
    assert args.budgets == {"GLNet": 1440.0}
    assert "GLNet: 1440" in memory_time.conditions_text(args)


@pytest.mark.parametrize("item, problem", [("GLNett=10", "METHOD=CPU_S"), ("GLNet=ten", "not a number")])
def test_train_budget_for_refuses_bad_items(tmp_path: Path, item: str, problem: str) -> None:
    with pytest.raises(SystemExit, match=problem):
        memory_time.parse_args(["--quick", "--out", str(tmp_path), "--train-budget-for", item])


def _training_run(folder: Path, scores: dict[str, float]) -> None:
    """A ``--phase train`` output folder: the training JSON and one state file per method."""
    (folder / "memory_time_states").mkdir(parents=True)
    training = {label: {"miou": miou, "miou_source": f"run in {folder.name}"} for label, miou in scores.items()}
    (folder / "memory_time_training.json").write_text(json.dumps({"header": {"date": folder.name},
                                                                  "training": training}))
    for label in scores:
        (folder / "memory_time_states" / f"{label.lower().replace(' ', '_')}.pt").write_bytes(b"state")


def test_training_from_merges_runs_split_over_cores(tmp_path: Path) -> None:
    first, second = tmp_path / "core0", tmp_path / "core1"
    _training_run(first, {"EHSNet": 60.0, "GLNet": 10.0})
    _training_run(second, {"GLNet": 40.0, "patch HRNet": 50.0})
    args = memory_time.parse_args(["--quick", "--out", str(tmp_path / "out"), "--methods", "EHSNet,GLNet,patch HRNet",
                                   "--training-from", str(first), "--training-from", str(second)])
    args.out.mkdir()  # as main does
    header: dict = {}
    trained, states = memory_time.accuracy_phase(args, header)
    # the first folder that trained a method wins
    assert {label: scores["miou"] for label, scores in trained.items()} == {
        "EHSNet": 60.0, "GLNet": 10.0, "patch HRNet": 50.0}
    assert states["patch HRNet"] == str(second / "memory_time_states" / "patch_hrnet.pt")
    assert set(header["training_from"]) == {str(first), str(second)}
    merged = json.loads((tmp_path / "out" / "memory_time_training.json").read_text())
    assert merged["training"]["patch HRNet"]["miou"] == 50.0


def test_training_from_names_a_method_no_run_trained(tmp_path: Path) -> None:
    _training_run(tmp_path / "core0", {"EHSNet": 60.0})
    args = memory_time.parse_args(["--quick", "--out", str(tmp_path / "out"), "--methods", "EHSNet,GLNet",
                                   "--training-from", str(tmp_path / "core0")])
    with pytest.raises(SystemExit, match="trained 'GLNet'"):
        memory_time.accuracy_phase(args, {})


def _measured_run(folder: Path, methods: list[str], test_s: float, state: str | None) -> None:
    """An earlier report's folder: one memory/time row and one inference row per method."""
    folder.mkdir(parents=True)
    rows = [{"method": label, "memory_mode": "none", "size": "128x128", "test_s": test_s} for label in methods]
    inference = [{"method": label, "global_s": test_s, "state": state} for label in methods]
    (folder / "memory_time.json").write_text(json.dumps({"header": {"date": folder.name}, "rows": rows,
                                                         "inference_rows": inference}))


def test_rows_from_merges_runs_and_probes_nothing_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _training_run(tmp_path / "trained", {"GLNet": 10.0, "patch HRNet": 50.0})
    states = tmp_path / "trained" / "memory_time_states"
    _measured_run(tmp_path / "core0", ["GLNet"], 1.0, str(states / "glnet.pt"))
    _measured_run(tmp_path / "core1", ["GLNet", "patch HRNet"], 2.0, str(states / "patch_hrnet.pt"))
    args = memory_time.parse_args(["--quick", "--out", str(tmp_path / "out"), "--methods", "GLNet,patch HRNet",
                                   "--training-from", str(tmp_path / "trained"),
                                   "--rows-from", str(tmp_path / "core0"), "--rows-from", str(tmp_path / "core1")])

    def no_probe(*_: object, **__: object) -> None:
        raise AssertionError("a row measured earlier was probed again")

    monkeypatch.setattr(memory_time, "infer_probe", no_probe)
    monkeypatch.setattr(memory_time, "train_probe", no_probe)
    header: dict = {}
    trained, states = memory_time.accuracy_phase(args, header)
    reused_rows, reused_inference = memory_time.earlier_rows(args.rows_from, header)
    inference_rows, views = memory_time.inference_phase(args, states, reused_inference)
    rows = memory_time.measure_phase(args, trained, views, reused_rows)
    assert [(r["method"], r["test_s"], r["miou"]) for r in rows] == [("GLNet", 1.0, 10.0), ("patch HRNet", 2.0, 50.0)]
    assert [(r["method"], r["global_s"]) for r in inference_rows] == [("GLNet", 1.0), ("patch HRNet", 2.0)]
    assert set(header["measured_rows_from"]) == {str(tmp_path / "core0"), str(tmp_path / "core1")}


def test_rows_from_probes_again_an_inference_row_of_other_weights(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _training_run(tmp_path / "trained", {"GLSNet": 10.0})
    _measured_run(tmp_path / "earlier", ["GLSNet"], 1.0, "/elsewhere/glsnet.pt")
    args = memory_time.parse_args(["--quick", "--out", str(tmp_path / "out"), "--methods", "GLSNet",
                                   "--training-from", str(tmp_path / "trained"),
                                   "--rows-from", str(tmp_path / "earlier")])
    probed = []

    def probe(label: str, *_: object) -> dict:
        probed.append(label)
        return {"status": "ok", "test_s": 3.0, "miou": 10.0}

    monkeypatch.setattr(memory_time, "infer_probe", probe)
    _, states = memory_time.accuracy_phase(args, {})
    _, reused_inference = memory_time.earlier_rows(args.rows_from, {})
    inference_rows, _ = memory_time.inference_phase(args, states, reused_inference)
    assert probed == ["GLSNet"] and inference_rows[0]["global_s"] == 3.0


def test_an_inference_row_whose_weights_are_gone_stands_as_measured(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # an earlier machine's training folder: its scores, but no state files any more
    _training_run(tmp_path / "trained", {"GLSNet": 10.0})
    (tmp_path / "trained" / "memory_time_states" / "glsnet.pt").unlink()
    _measured_run(tmp_path / "earlier", ["GLSNet"], 1.0, "/earlier-machine/glsnet.pt")
    args = memory_time.parse_args(["--quick", "--out", str(tmp_path / "out"), "--methods", "GLSNet",
                                   "--training-from", str(tmp_path / "trained"),
                                   "--rows-from", str(tmp_path / "earlier")])

    def no_probe(*_: object, **__: object) -> None:
        raise AssertionError("probing now would score weights that are not the trained ones")

    monkeypatch.setattr(memory_time, "infer_probe", no_probe)
    _, states = memory_time.accuracy_phase(args, {})
    _, reused_inference = memory_time.earlier_rows(args.rows_from, {})
    inference_rows, _ = memory_time.inference_phase(args, states, reused_inference)
    assert states["GLSNet"] is None and inference_rows[0]["global_s"] == 1.0


def test_a_training_child_gets_wall_time_for_its_cpu_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = []

    def recording_run_config(target: str, params: dict, **options: object) -> object:
        limits.append((params["budget_cpu_s"], options["timeout_s"]))
        raise SystemExit("recorded")

    monkeypatch.setattr(memory_time, "run_config", recording_run_config)
    args = memory_time.parse_args(["--quick", "--out", str(tmp_path), "--train-budget-for", "GLNet=1440"])
    with pytest.raises(SystemExit, match="recorded"):
        memory_time.trained_state("GLNet", args, tmp_path)
    [(budget, limit)] = limits
    assert budget == 1440.0 and limit >= 3 * budget  # a shared machine stretches wall time
