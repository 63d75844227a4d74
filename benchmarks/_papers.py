"""The papers' own efficiency figures, as data, to print beside our measurements (labelled theirs).

Sources (copied by hand from /work/shared/papers/):
- EHSNet, Table 3: efficiency on FBP, 24 GB GPU + 1024 GB host, "memory cost calculated with the
  maximum mini-batch sizes of each during training", "time cost calculated with the forwarding
  procedure of one LRI". Empty GPU cells are empty in the paper.
- GLSNet, Table 3: mIoU and inference GPU memory, local (patch) versus global (whole-image)
  inference on DeepGlobe; Tables 5 and 6: architecture and fusion ablations (mIoU, memory).
"""

from __future__ import annotations

from typing import Any

from _harness import Column

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
    {"model": "TransUnet", "local_miou": 68.2, "local_mb": 2436, "global_miou": 70.2, "global_mb": 6283},
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


def paper_tables() -> dict[str, Any]:
    """All the papers' figures as one JSON-able dict, each with its source line."""
    return {
        "ehsnet_table3": {"source": EHSNET_TABLE3_SOURCE, "rows": EHSNET_TABLE3},
        "glsnet_table3": {"source": GLSNET_TABLE3_SOURCE, "rows": GLSNET_TABLE3},
        "glsnet_table5": {"source": GLSNET_TABLE5_SOURCE, "rows": GLSNET_TABLE5},
        "glsnet_table6": {"source": GLSNET_TABLE6_SOURCE, "rows": GLSNET_TABLE6},
    }
