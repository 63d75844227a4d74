"""The papers' own efficiency figures, as data, to print beside our measurements (labelled theirs).

Sources (copied by hand from /work/shared/papers/):
- EHSNet, Tables 1 and 2: mIoU of generic and UHRIS methods on FBP and on Inria Aerial.
- EHSNet, Table 3: efficiency on FBP, 24 GB GPU + 1024 GB host, "memory cost calculated with the
  maximum mini-batch sizes of each during training", "time cost calculated with the forwarding
  procedure of one LRI". Empty GPU cells are empty in the paper.
- GLSNet, Table 3: mIoU and inference GPU memory, local (patch) versus global (whole-image)
  inference on DeepGlobe; Tables 5 and 6: architecture and fusion ablations (mIoU, memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from _harness import Column

EHSNET_TABLE1_SOURCE = "EHSNet paper, Table 1 (FBP test mIoU) - their figures"
EHSNET_TABLE1: list[dict[str, Any]] = [
    {"method": "GoogLeNet", "type": "Generic SS", "miou": 28.99},
    {"method": "ResNet", "type": "Generic SS", "miou": 33.59},
    {"method": "UNet", "type": "Generic SS", "miou": 44.51},
    {"method": "PSPNet", "type": "Generic SS", "miou": 53.33},
    {"method": "DeepLabv3+", "type": "Generic SS", "miou": 48.97},
    {"method": "UperNet", "type": "Generic SS", "miou": 51.08},
    {"method": "HRNet", "type": "Generic SS", "miou": 53.83},
    {"method": "STDC", "type": "Generic SS", "miou": 51.29},
    {"method": "Swin", "type": "Generic SS", "miou": 50.49},
    {"method": "GLNet", "type": "UHRIS (LRISS)", "miou": 42.05},
    {"method": "FCtL", "type": "UHRIS (LRISS)", "miou": 48.28},
    {"method": "MagNet", "type": "UHRIS (LRISS)", "miou": 44.20},
    {"method": "ISDNet", "type": "UHRIS (LRISS)", "miou": 21.98},
    {"method": "EHSNet", "type": "LRISS", "miou": 59.48},
]
EHSNET_TABLE2_SOURCE = "EHSNet paper, Table 2 (Inria Aerial mIoU, collected by the authors from GLNet, ISDNet and FCtL) - their figures"
EHSNET_TABLE2: list[dict[str, Any]] = [
    {"method": "ICNet", "type": "Generic SS", "miou": 31.10},
    {"method": "FCN", "type": "Generic SS", "miou": 69.10},
    {"method": "DeepLabv3+", "type": "Generic SS", "miou": 55.90},
    {"method": "STDC", "type": "Generic SS", "miou": 72.44},
    {"method": "GLNet", "type": "UHRIS (LRISS)", "miou": 71.20},
    {"method": "CascadePSP", "type": "UHRIS (LRISS)", "miou": 69.40},
    {"method": "FCtL", "type": "UHRIS (LRISS)", "miou": 72.87},
    {"method": "ISDNet", "type": "UHRIS (LRISS)", "miou": 74.23},
    {"method": "EHSNet", "type": "LRISS", "miou": 78.51},
]
EHSNET_MIOU_COLUMNS = [Column("method", "Method (paper)"), Column("type", "Type"), Column("miou", "mIoU %", 2)]

EHSNET_TABLE3_SOURCE = "EHSNet paper, Table 3 (FBP, 24 GB GPU, 1024 GB host) - their figures"
EHSNET_TABLE3: list[dict[str, Any]] = [
    {"method": "GLNet", "miou": 42.05, "gpu_gb": None, "host_gb": 285.0, "train_s": 344.0, "test_s": 54.0},
    {"method": "FCtL", "miou": 48.28, "gpu_gb": 24.0, "host_gb": 164.0, "train_s": 356.0, "test_s": 24.0},
    {"method": "MagNet", "miou": 44.20, "gpu_gb": 24.0, "host_gb": 4.5, "train_s": 3.2, "test_s": 34.0},
    {"method": "ISDNet", "miou": 21.98, "gpu_gb": None, "host_gb": 10.1, "train_s": 1.3, "test_s": 2.8},
    {"method": "EHSNet", "miou": 59.48, "gpu_gb": 24.0, "host_gb": 117.0, "train_s": 16.6, "test_s": 4.8},
]
EHSNET_TABLE3_COLUMNS = [
    Column("method", "Method (paper)"),
    Column("miou", "mIoU %"),
    Column("gpu_gb", "GPU memory GB", 0, "(blank in paper)"),
    Column("host_gb", "Host memory GB", 1),
    Column("train_s", "Training time s", 1),
    Column("test_s", "Testing time s", 1),
]

GLSNET_TABLE3_SOURCE = "GLSNet paper, Table 3 (DeepGlobe test, inference GPU memory) - their figures"
GLSNET_TABLE3: list[dict[str, Any]] = [
    {"model": "U-Net", "local_miou": 37.3, "local_mb": 949, "global_miou": 38.4, "global_mb": 5507},
    {"model": "ICNet", "local_miou": 35.5, "local_mb": 1195, "global_miou": 40.2, "global_mb": 2557},
    {"model": "PSPNet", "local_miou": 53.3, "local_mb": 1513, "global_miou": 56.6, "global_mb": 6289},
    {"model": "SegNet", "local_miou": 60.8, "local_mb": 1139, "global_miou": 61.2, "global_mb": 10339},
    {"model": "DeepLabv3+", "local_miou": 63.1, "local_mb": 1279, "global_miou": 63.5, "global_mb": 3199},
    {"model": "FCN-8s", "local_miou": 64.3, "local_mb": 1963, "global_miou": 70.1, "global_mb": 5227},
    {"model": "Mask2Former", "local_miou": 66.7, "local_mb": 3458, "global_miou": 70.3, "global_mb": 23577},
    {"model": "TransUNet", "local_miou": 68.2, "local_mb": 2436, "global_miou": 70.2, "global_mb": 6283},
    # GLNet and GLSNet use both views at once: the paper gives one mIoU and one memory figure.
    {"model": "GLNet (local & global)", "local_miou": None, "local_mb": None, "global_miou": 71.6, "global_mb": 1865},
    {"model": "GLSNet (local & global)", "local_miou": None, "local_mb": None, "global_miou": 72.4, "global_mb": 1414},
]
GLSNET_TABLE3_COLUMNS = [
    Column("model", "Model (paper)"),
    Column("local_miou", "Local mIoU %", 1, "-"),
    Column("local_mb", "Local memory MB", 0, "-"),
    Column("global_miou", "Global mIoU %", 1),
    Column("global_mb", "Global memory MB", 0),
]

GLSNET_TABLE5_SOURCE = "GLSNet paper, Table 5 (architecture ablation, DeepGlobe) - their figures"
GLSNET_TABLE5: list[dict[str, Any]] = [
    {"model": "GLNet (baseline): R50/R50, FPN", "miou": 71.6, "memory_mb": 1865},
    {"model": "Shallow-Deep: R18 global / R50 local, GL-Deep Fusion", "miou": 72.4, "memory_mb": 1414},
    {"model": "Shallow-Shallow: R18/R18, GL-Deep Fusion", "miou": 71.9, "memory_mb": 1044},
    {"model": "Deep-Deep: R50/R50, FPN + GL-Deep Fusion", "miou": 72.6, "memory_mb": 2903},
]
GLSNET_TABLE6_SOURCE = "GLSNet paper, Table 6 (fusion ablation, DeepGlobe) - their figures"
GLSNET_TABLE6: list[dict[str, Any]] = [
    {"model": "GLNet (baseline) FPN sharing", "miou": 71.6, "memory_mb": 1865},
    {"model": "Attention (DANet)", "miou": 71.4, "memory_mb": 1510},
    {"model": "Attention (transformer) = GL-Deep Fusion", "miou": 72.4, "memory_mb": 1414},
]
GLSNET_ABLATION_COLUMNS = [
    Column("model", "Model (paper)"),
    Column("miou", "mIoU %", 1),
    Column("memory_mb", "GPU memory MB", 0),
]


# The comparison tables whose every method must be measured here or explained (PAPER_METHODS).
COMPARISON_TABLES: dict[str, list[dict[str, Any]]] = {
    "EHSNet T1": EHSNET_TABLE1,
    "EHSNet T2": EHSNET_TABLE2,
    "EHSNet T3": EHSNET_TABLE3,
    "GLSNet T3": GLSNET_TABLE3,
}


@dataclass(frozen=True)
class PaperMethod:
    """A method of the papers' comparison tables and what stands for it here.

    Attributes:
        runs_as: the ``_workloads.METHODS`` labels measured for it (empty if it is not built).
        not_built: why it has no row here, in one line (empty if it runs).
    """

    runs_as: tuple[str, ...] = ()
    not_built: str = ""


# Keyed by the name as the tables print it (EHSNet's "UNet" and GLSNet's "U-Net" are one method).
PAPER_METHODS: dict[str, PaperMethod] = {
    "GoogLeNet": PaperMethod(not_built="an ImageNet classification network run patch-wise in the FBP paper, whose "
                             "figure the EHSNet authors collected from it: not a segmentation architecture"),
    "ResNet": PaperMethod(not_built="as GoogLeNet: a classification network's patch-wise FBP figure collected from "
                          "the FBP paper; ResNets stand here as encoders (ICNet, MagNet, FCtL, GLNet, smp)"),
    "UNet": PaperMethod(("U-Net",)),
    "U-Net": PaperMethod(("U-Net",)),
    "PSPNet": PaperMethod(("PSPNet",)),
    "DeepLabv3+": PaperMethod(("DeepLabv3+",)),
    "UperNet": PaperMethod(("UPerNet",)),
    "HRNet": PaperMethod(("patch HRNet", "downsampled HRNet")),
    "STDC": PaperMethod(("STDC",)),
    "Swin": PaperMethod(("Swin-UPerNet",)),
    "GLNet": PaperMethod(("GLNet",)),
    "FCtL": PaperMethod(("FCtL",)),
    "MagNet": PaperMethod(("MagNet",)),
    "ISDNet": PaperMethod(("ISDNet",)),
    "EHSNet": PaperMethod(("EHSNet",)),
    "ICNet": PaperMethod(("ICNet",)),
    # Long et al. 2015, the FCN the Inria figure was collected for; torchvision's ResNet-50 FCN
    # is the later variant MMSegmentation calls FCN.
    "FCN": PaperMethod(("FCN-8s", "FCN")),
    "CascadePSP": PaperMethod(not_built="a class-agnostic refiner of another model's segmentation, not a segmenter; "
                              "the EHSNet authors left it out of FBP for the same reason"),
    "SegNet": PaperMethod(("SegNet",)),
    "FCN-8s": PaperMethod(("FCN-8s",)),
    "Mask2Former": PaperMethod(not_built="mask classification with a multi-scale deformable-attention pixel decoder, "
                               "a masked-attention query decoder and a Hungarian-matched set loss: more than a day "
                               "to write faithfully; of this project's libraries smp and timm do not build it (Hugging Face "
                               "transformers does; not a dependency)"),
    "TransUNet": PaperMethod(("TransUNet",)),
    "GLSNet": PaperMethod(("GLSNet",)),
}


def paper_method_name(row: dict[str, Any]) -> str:
    """The method a row of a comparison table names (GLSNet's "GLNet (local & global)" is GLNet)."""
    return str(row.get("method") or row["model"]).split(" (")[0]


def paper_method_rows(measured: list[str], not_run: dict[str, str]) -> list[dict[str, Any]]:
    """One row per method of the papers' comparison tables: the tables, our rows for it, and their status.

    Args:
        measured: the ``METHODS`` labels this run measured.
        not_run: labels that could not run here, with the reason.

    Returns:
        ``[{"method", "tables", "measured_as", "status"}]`` in the order the tables name them;
        ``status`` is ``run``, ``not run here: <reason>``, ``not selected (--methods)`` or
        ``not built: <reason>``, per label when a method has several.
    """
    tables: dict[str, list[str]] = {}
    for table, rows in COMPARISON_TABLES.items():
        for row in rows:
            tables.setdefault(paper_method_name(row), []).append(table)
    out = []
    for name, in_tables in tables.items():
        entry = PAPER_METHODS[name]
        if entry.not_built:
            status = f"not built: {entry.not_built}"
        else:
            states = {}
            for label in entry.runs_as:
                states[label] = ("run" if label in measured else
                                 f"not run here: {not_run[label]}" if label in not_run else "not selected (--methods)")
            if len(set(states.values())) == 1:  # one label, or all alike
                status = next(iter(states.values()))
            else:
                status = "; ".join(f"{label}: {state}" for label, state in states.items())
        out.append({"method": name, "tables": ", ".join(in_tables), "measured_as": ", ".join(entry.runs_as) or "-",
                    "status": status})
    return out


PAPER_METHOD_COLUMNS = [
    Column("method", "Method (paper)"),
    Column("tables", "Tables"),
    Column("measured_as", "Measured here as"),
    Column("status", "Status in this run"),
]


def paper_tables() -> dict[str, Any]:
    """All the papers' figures as one JSON-able dict, each with its source line."""
    return {
        "ehsnet_table1": {"source": EHSNET_TABLE1_SOURCE, "rows": EHSNET_TABLE1},
        "ehsnet_table2": {"source": EHSNET_TABLE2_SOURCE, "rows": EHSNET_TABLE2},
        "ehsnet_table3": {"source": EHSNET_TABLE3_SOURCE, "rows": EHSNET_TABLE3},
        "glsnet_table3": {"source": GLSNET_TABLE3_SOURCE, "rows": GLSNET_TABLE3},
        "glsnet_table5": {"source": GLSNET_TABLE5_SOURCE, "rows": GLSNET_TABLE5},
        "glsnet_table6": {"source": GLSNET_TABLE6_SOURCE, "rows": GLSNET_TABLE6},
    }
