"""What a benchmark child process runs: `lrss-ds train` on a synthetic tile store, scoring, and local/global inference.

Each public function here is the target of one fresh process (``_harness.run_config``): it
takes JSON-able arguments and returns a JSON-able dict. The parent measures the process's peak
RSS; these functions measure time and accuracy.

The synthetic task is ``lrss_ds.data.synth``'s: river and lake share one spectral signature
and texture and differ only by extent (the river crosses the scene, a lake is a blob), so a
patch model cannot tell them apart from inside and a holistic model can. That holds only where
a patch is smaller than a lake and than the river's width; ``water_scale`` widens both (see
``make_layout``). Training goes through the product (``product_train``: the trainer makes its
tile store); the scenes scored and predicted are rendered in memory (the same pixels the
``synth`` CLI writes) so the benchmark does not time GeoTIFF I/O.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RIVER_LAKE = ("river", "lake")


COMMON_LR = 1e-3
"""The learning rate every method trains with unless its ``Method.lr`` says otherwise."""

# GLNet, MagNet and FCtL end in FPN layers without normalisation; under AdamW at 1e-3 their
# loss blew up in the first steps (10-step means: GLNet 2283, MagNet 36, FCtL 53, against
# 3-4 at the start; 30 steps on 128 px synthetic scenes: GLNet 300-870, MagNet 15-34, FCtL 8-24) and was
# still recovering when the budget ended. At 1e-4, their authors' order (GLNet: Adam 1e-4),
# the same 30 steps fall steadily (GLNet 3.6 -> 1.7, MagNet 3.7 -> 2.1, FCtL 1.5 -> 0.7).
FPN_LR = 1e-4


@dataclass(frozen=True)
class Method:
    """A compared method: which model, how it is trained and how it predicts.

    Attributes:
        label: the row label in tables (as the papers name it).
        model: ``MODEL_BUILDERS`` name.
        options: ``build_model`` options (sizes filled in by ``options_for``).
        sampling: ``"whole"`` (one whole scene per step) or ``"patch"`` (patches).
        loss: ``build_loss`` name.
        lr: AdamW learning rate of its benchmark training (``COMMON_LR`` unless that diverges).
    """

    label: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    sampling: str = "whole"
    loss: str = "ce"
    lr: float = COMMON_LR


PATCH_BATCH = 8
"""Patches per optimizer step of the patch-trained methods, in training and in the time probe."""

METHODS: dict[str, Method] = {
    m.label: m
    for m in (
        Method("patch HRNet", "hrnet_fcn", {"mode": "patch"}, "patch", "ce"),
        Method("downsampled HRNet", "hrnet_fcn", {"mode": "downsampled", "downsample": 4}, "whole", "ce"),
        Method("GLNet", "glnet", {}, "whole", "ce", lr=FPN_LR),
        Method("GLSNet", "glsnet", {}, "whole", "focal"),
        Method("EHSNet", "ehsnet", {}, "whole", "ehsnet"),
        Method("ISDNet", "isdnet", {}, "whole", "isdnet"),
        Method("STDC", "stdc", {}, "whole", "stdc"),
        Method("MagNet", "magnet", {}, "whole", "ce", lr=FPN_LR),
        Method("FCtL", "fctl", {}, "whole", "ce", lr=FPN_LR),
        # The generic networks of the papers' tables (ResNet-50 encoders as in their baselines),
        # trained on patches and predicted in sliding windows, as generic SS is (EHSNet Fig. 1a).
        Method("U-Net", "smp", {"arch": "unet", "encoder": "resnet50"}, "patch", "ce"),
        Method("PSPNet", "smp", {"arch": "pspnet", "encoder": "resnet50"}, "patch", "ce"),
        Method("DeepLabv3+", "smp", {"arch": "deeplabv3plus", "encoder": "resnet50"}, "patch", "ce"),
        Method("UPerNet", "smp", {"arch": "upernet", "encoder": "resnet50"}, "patch", "ce"),
        # Swin-T under UPerNet, as MMSegmentation (the EHSNet authors' framework) builds "Swin"
        Method("Swin-UPerNet", "smp", {"arch": "upernet", "encoder": "tu-swin_tiny_patch4_window7_224"}, "patch", "ce"),
        Method("FCN", "tv_fcn", {"backbone": "resnet50"}, "patch", "ce"),
        Method("SegNet", "segnet", {}, "patch", "ce"),
        Method("ICNet", "icnet", {}, "patch", "ce"),
        Method("FCN-8s", "fcn8s", {}, "patch", "ce"),
        Method("TransUNet", "transunet", {}, "patch", "ce"),
    )
}


def options_for(method: Method, patch: int) -> dict[str, Any]:
    """``build_model`` options of ``method`` with its patch/crop size set to ``patch``."""
    options = dict(method.options)
    if options.get("mode") == "downsampled":
        # 4x as in the papers' baselines; 2x for the tiny test sizes, where 4x leaves the
        # stride-32 branch a single pixel (BatchNorm cannot train on that).
        options["downsample"] = 4 if patch >= 128 else 2
    if method.model == "hrnet_fcn" and options.get("mode") == "patch":
        options["patch_size"] = patch
        options["overlap"] = patch // 4
    elif method.model in ("glsnet",):
        options["crop_size"] = patch
        options["global_context"] = max(32, min(256, patch // 2) // 32 * 32)
    elif method.model == "glnet":
        # As in GLNet: the global view is the whole image downsampled to one patch's size.
        options["crop_size"] = patch
        options["global_size"] = patch
    elif method.model == "transunet":
        # One position-embedding vector per token of a training patch, as at the paper's 224 px.
        options["pos_grid"] = max(1, patch // 16)
    elif method.model in ("magnet", "fctl"):
        # MagNet: full-resolution crops, the coarsest scale the whole image at one crop's size;
        # FCtL: local crops with their 2x and 3x contexts.
        options["crop_size"] = patch
    return options


def unavailable(method: Method) -> str | None:
    """Why ``method`` cannot run here (its library model's package does not import), or None."""
    from lrss_ds.models.smp_adapter import LIBRARY_MODELS, library_problem

    return library_problem(method.model) if method.model in LIBRARY_MODELS else None


def synthetic_scenes(count: int, size: int, bands: int, seed: int,
                     water_scale: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Render ``count`` synthetic scenes of ``size x size`` in memory.

    Args:
        count: scenes.
        size: square side.
        bands: image bands.
        seed: the layouts' run seed.
        water_scale: ``make_layout``'s factor on the river width and lake radii.

    Returns:
        ``[(image (C, H, W) uint8, label (H, W) uint8), ...]``.
    """
    from lrss_ds.data.synth import make_layout, render_scene

    return [render_scene(make_layout(seed, index, size, size, water_scale), bands) for index in range(count)]


def model_device(net: Any) -> Any:
    """The ``torch.device`` holding ``net``'s parameters (where its inputs must go)."""
    return next(net.parameters()).device


def accelerator_device() -> Any:
    """The ``torch.device`` DeepSpeed's accelerator computes on in this process (``cuda:0``, ``cpu``)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _class_names() -> list[str]:
    """The synthetic dataset's class names."""
    from lrss_ds.data.catalog import get_dataset

    return list(get_dataset("synthetic").classes)


def score_scenes(model: Any, scenes: list[tuple[np.ndarray, np.ndarray]], num_classes: int,
                 window: int | None, overlap: int) -> dict[str, Any]:
    """Predict ``scenes`` with ``lrss_ds.engine.inference.Predictor`` and score them.

    Args:
        model: eval-mode model; it predicts on the device that holds it.
        scenes: ``[(image, label)]``.
        num_classes: K.
        window: sliding-window size (local inference) or ``None`` (global: whole scene).
        overlap: window overlap in pixels.

    Returns:
        ``miou`` (percent), ``iou`` per class name (percent), ``test_s`` per image (mean).
    """
    import torch

    from lrss_ds.engine.metrics import ConfusionMatrix
    from lrss_ds.data.rasters import RasterSource
    from lrss_ds.engine.inference import Predictor

    window_hw = None if window is None else (window, window)
    predictor = Predictor(model=model, num_classes=num_classes, ignore_index=None, window=window_hw, overlap=overlap,
                          device=model_device(model))
    matrix = ConfusionMatrix(num_classes, 255)
    times = []
    for index, (image, label) in enumerate(scenes):
        source = RasterSource.from_array(image, f"scene{index}", where=f"synthetic scene {index}")
        start = time.perf_counter()
        with torch.inference_mode():
            for row, classes, _ in predictor.strips(source):
                matrix.update(classes, label[row : row + classes.shape[0]])
        times.append(time.perf_counter() - start)
    result = matrix.compute()
    names = _class_names()
    iou = {names[k]: _pct(v) for k, v in enumerate(result["iou"])}
    return {"miou": _pct(result["miou"]), "iou": iou, "test_s": float(np.mean(times)), "test_s_all": times}


def _pct(value: Any) -> float | None:
    """A 0..1 metric as percent (None when NaN: the class is absent)."""
    value = float(value)
    return None if np.isnan(value) else 100.0 * value


def product_train(
    method: str,
    budget_cpu_s: float,
    scene_size: int,
    patch: int,
    run_dir: str,
    train_scenes: int = 64,
    val_scenes: int = 3,
    bands: int = 4,
    seed: int = 0,
    lr: float | None = None,
    water_scale: float = 1.0,
    bn_scenes: float = 8.0,
    patch_batch: int = PATCH_BATCH,
    state_out: str | None = None,
    max_steps: int = 1_000_000,
    store: str | None = None,
) -> dict[str, Any]:
    """Train ``method`` with ``lrss-ds train`` on a synthetic tile store for a CPU-time budget, then score it.

    The product's own run (``lrss_ds.cli.main(["train", ...])``, what a user's ``lrss-ds train``
    executes): the trainer makes the synthetic store (``data.synthetic``), samples whole scenes
    or ``patch_batch`` random ``patch`` crops per step (``data.mode: patch``, DeepSpeed's micro
    batch), flips/turns every sample (``train.augment: d4``), stops at ``budget_cpu_s`` CPU
    seconds (``train.budget_cpu_s``), recomputes BatchNorm statistics with the final weights
    over ``bn_scenes`` scenes' worth of training samples (``train.recalibrate_bn``) and saves
    the checkpoint. AdamW at the method's ``lr``, ``ds_configs/cpu.json``, memory mode ``none``, constant
    learning rate: the same for every method. The checkpoint is then scored by
    :func:`evaluate_checkpoint` on ``val_scenes`` in-memory scenes of other layouts (seed 1000),
    predicted as the checkpoint says (sliding windows for patch methods).

    Args:
        method: a ``METHODS`` label.
        budget_cpu_s: CPU seconds of the training loop (``train.budget_cpu_s``).
        scene_size: square scene side.
        patch: patch side for patch training / local inference / GLNet-GLSNet crops.
        run_dir: the run's folder (store, experiment YAML, checkpoints, metrics.json).
        train_scenes: synthetic training scenes.
        val_scenes: scenes scored after training.
        bands: input bands.
        seed: ``data.synthetic.seed`` and ``train.seed``.
        lr: learning rate (default: the method's ``Method.lr``).
        water_scale: ``make_layout``'s factor on river width and lake radii.
        bn_scenes: scenes' worth of pixels for the BatchNorm recalibration (0: off).
        patch_batch: patches per step of patch methods.
        state_out: if given, the trained weights in the format the inference probes load.
        max_steps: ``train.iterations``, the cap behind the budget.
        store: the synthetic tile store (default ``run_dir/store``); methods trained one after
            another can share one, the trainer makes it once for the same ``data.synthetic``.

    Returns:
        :func:`evaluate_checkpoint`'s scores plus ``steps``, ``train_cpu_s``, ``train_wall_s``
        (the trainer's budget clock), ``stopped_by``, ``final_loss``, ``loss_curve``,
        ``run_dir`` and the options trained with.
    """
    import yaml

    from lrss_ds.cli import main as lrss_ds_main

    spec = METHODS[method]
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    patch_sampling = spec.sampling == "patch"
    sample_pixels = patch * patch if patch_sampling else scene_size * scene_size
    options = options_for(spec, patch)
    experiment = {
        "model": {"name": spec.model, "options": options},
        "data": {
            "store": store or str(out / "store"),
            "synthetic": {"train_scenes": train_scenes, "val_scenes": 1, "height": scene_size, "width": scene_size,
                          "bands": bands, "seed": seed, "water_scale": water_scale},
            "mode": "patch" if patch_sampling else "whole",
            "patch_size": patch,
            "patches_per_scene": patch_batch,
        },
        "optim": {"type": "adamw", "lr": spec.lr if lr is None else lr, "weight_decay": 1e-4},
        "memory": {"preset": "none"},
        "deepspeed": {"config": str(Path(__file__).resolve().parents[1] / "ds_configs" / "cpu.json"),
                      "override": {"train_micro_batch_size_per_gpu": patch_batch if patch_sampling else 1}},
        "loss": {"name": spec.loss},
        "train": {
            "seed": seed, "iterations": max_steps, "eval_every": 0, "checkpoint_every": 0, "keep_last": 1,
            "log_every": 10, "output": str(out / "run"), "augment": "d4",
            "recalibrate_bn": int(round(bn_scenes * scene_size * scene_size / sample_pixels)),
            "budget_cpu_s": budget_cpu_s,
        },
    }
    config_path = out / "experiment.yaml"
    config_path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    code = lrss_ds_main(["train", "--config", str(config_path)])
    if code != 0:
        raise RuntimeError(f"lrss-ds train of {method} exited with {code} (log in {out / 'run'})")
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"] if h.get("loss") is not None]
    spent = metrics.get("budget", {}).get("spent", {})
    scores = evaluate_checkpoint(str(out / "run"), scene_size, patch, bands, val_scenes, state_out=state_out,
                                 water_scale=water_scale)
    return {
        **scores,
        "method": method,
        "steps": metrics["iteration"],
        "train_cpu_s": spent.get("cpu_s"),
        "train_wall_s": spent.get("wall_s"),
        "stopped_by": metrics.get("stopped_by"),
        "final_loss": losses[-1] if losses else float("nan"),
        "loss_curve": [float(np.mean(part)) for part in np.array_split(np.asarray(losses), min(10, len(losses)))]
        if losses else [],
        "recalibrate_bn": experiment["train"]["recalibrate_bn"],
        "water_scale": water_scale,
        "patch_batch": patch_batch if patch_sampling else None,
        "scene_size": scene_size,
        "patch": patch,
        "options": options,
        "run_dir": str(out / "run"),
    }


def infer(
    method: str,
    size: int,
    patch: int,
    view: str,
    state: str | None = None,
    scenes: int = 1,
    bands: int = 4,
    seed: int = 1000,
    water_scale: float = 1.0,
) -> dict[str, Any]:
    """Inference time (and mIoU when trained weights are given) of one view on synthetic scenes.

    Args:
        method: a ``METHODS`` label.
        size: square scene side.
        patch: window side of local inference (and the model's patch/crop option).
        view: ``"local"`` (sliding ``patch`` windows, overlap ``patch // 4``) or ``"global"``
            (the whole scene in one forward).
        state: ````product_train``'s saved state; without it the weights are random and ``miou``
            is ``None``.
        scenes: scenes predicted (the time is per scene).
        bands: input bands.
        seed: scene seed.
        water_scale: ``make_layout``'s factor on river width and lake radii.

    Returns:
        ``test_s`` per image, ``miou``/``iou`` (or None), ``view``.
    """
    import torch

    from lrss_ds.models import build_model

    spec = METHODS[method]
    torch.manual_seed(0)
    num_classes = len(_class_names())
    if state:
        saved = torch.load(state, map_location="cpu", weights_only=True)
        config = dict(saved["config"])
        net = build_model(config.pop("name"), **config)
        net.load_state_dict(saved["state_dict"])
    else:
        net = build_model(spec.model, num_classes, bands, **options_for(spec, patch))
    net.to(accelerator_device()).eval()
    data = synthetic_scenes(scenes, size, bands, seed, water_scale)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # model and scenes loaded
    window = patch if view == "local" else None
    scores = score_scenes(net, data, num_classes, window, patch // 4 if window else 0)
    if not state:
        scores["miou"] = None
        scores["iou"] = None
    return {**scores, "view": view, "method": method, "size": size, "rss_before_bytes": rss_before}


def evaluate_checkpoint(
    checkpoint: str,
    size: int,
    patch: int,
    bands: int = 4,
    val_scenes: int = 3,
    seed: int = 1000,
    state_out: str | None = None,
    water_scale: float = 1.0,
) -> dict[str, Any]:
    """Score a trained checkpoint (run dir, DeepSpeed tag or weights file) on synthetic val scenes.

    The model predicts as its checkpoint says (``predictor_for``: sliding windows for patch
    models, whole scene otherwise). Its weights are re-saved to ``state_out`` in
    ``product_train``'s format so the inference probes can load them.

    Returns:
        ``miou``, ``iou`` per class, ``river_lake_miou``, ``test_s``, ``inference``.
    """
    import torch

    from lrss_ds.engine.model_io import load_model
    from lrss_ds.engine.inference import predictor_for

    model, meta = load_model(checkpoint, device=accelerator_device())
    predictor = predictor_for(model, meta, device=model_device(model))
    val = synthetic_scenes(val_scenes, size, bands, seed, water_scale)
    window = None if predictor.window is None else int(predictor.window[0])
    scores = score_scenes(model, val, model.num_classes, window, predictor.overlap)
    if state_out:
        torch.save({"config": model.config(), "state_dict": model.state_dict()}, state_out)
    river_lake = [scores["iou"].get(name) for name in RIVER_LAKE]
    return {**scores, "river_lake_miou": None if None in river_lake else float(np.mean(river_lake)),
            "inference": "local" if predictor.window else "global"}
