"""What a benchmark child process runs: short synthetic training, and local/global inference.

Each public function here is the target of one fresh process (``_harness.run_config``): it
takes JSON-able arguments and returns a JSON-able dict. The parent measures the process's peak
RSS; these functions measure time and accuracy.

The synthetic task is ``lrss_ds.data.synth``'s: river and lake share one spectral signature
and texture and differ only by extent (the river crosses the scene, a lake is a blob), so a
patch model cannot tell them apart from inside and a holistic model can. That holds only where
a patch is smaller than a lake and than the river's width; ``water_scale`` widens both (see
``make_layout``). Scenes are rendered in memory (the same pixels the ``synth`` CLI writes) so
the benchmark does not time GeoTIFF I/O.
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RIVER_LAKE = ("river", "lake")


@dataclass(frozen=True)
class Method:
    """A compared method: which model, how it is trained and how it predicts.

    Attributes:
        label: the row label in tables (as the papers name it).
        model: ``MODEL_BUILDERS`` name.
        options: ``build_model`` options (sizes filled in by ``options_for``).
        sampling: ``"whole"`` (one whole scene per step) or ``"patch"`` (patches).
        loss: ``build_loss`` name.
    """

    label: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    sampling: str = "whole"
    loss: str = "ce"


METHODS: dict[str, Method] = {
    m.label: m
    for m in (
        Method("patch HRNet", "hrnet_fcn", {"mode": "patch"}, "patch", "ce"),
        Method("downsampled HRNet", "hrnet_fcn", {"mode": "downsampled", "downsample": 4}, "whole", "ce"),
        Method("GLNet", "glnet", {}, "whole", "ce"),
        Method("GLSNet", "glsnet", {}, "whole", "focal"),
        Method("EHSNet", "ehsnet", {}, "whole", "ehsnet"),
        Method("ISDNet", "isdnet", {}, "whole", "isdnet"),
        Method("STDC", "stdc", {}, "whole", "stdc"),
        Method("MagNet", "magnet", {}, "whole", "ce"),
        Method("FCtL", "fctl", {}, "whole", "ce"),
        # The generic networks of the papers' tables (ResNet-50 encoders as in their baselines),
        # trained on patches and predicted in sliding windows, as generic SS is (EHSNet Fig. 1a).
        Method("U-Net", "smp", {"arch": "unet", "encoder": "resnet50"}, "patch", "ce"),
        Method("PSPNet", "smp", {"arch": "pspnet", "encoder": "resnet50"}, "patch", "ce"),
        Method("DeepLabv3+", "smp", {"arch": "deeplabv3plus", "encoder": "resnet50"}, "patch", "ce"),
        Method("UPerNet", "smp", {"arch": "upernet", "encoder": "resnet50"}, "patch", "ce"),
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


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random one of the 8 flips/right-angle turns (``lrss_ds.data.augment.dihedral``), drawn from ``rng``.

    They keep what tells river from lake (extent and shape), so they add views of the same
    task; every method gets them, so the patch model's many crop positions are not its only
    source of variety.
    """
    from lrss_ds.data.augment import dihedral

    turns, mirror = int(rng.integers(4)), bool(rng.integers(2))
    return dihedral(image, label, turns + 4 * mirror)


def sample(scenes: list[tuple[np.ndarray, np.ndarray]], patch: int | None,
           rng: np.random.Generator, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A training batch: random scenes, whole or random ``patch`` crops, randomly turned/flipped.

    Returns:
        ``(images (B, C, h, w), labels (B, h, w))``; whole scenes must share one size.
    """
    images, labels = [], []
    for _ in range(batch):
        image, label = scenes[int(rng.integers(len(scenes)))]
        if patch is not None:
            height, width = label.shape
            r = int(rng.integers(0, height - patch + 1))
            c = int(rng.integers(0, width - patch + 1))
            image, label = image[:, r : r + patch, c : c + patch], label[r : r + patch, c : c + patch]
        image, label = augment(image, label, rng)
        images.append(image)
        labels.append(label)
    return np.stack(images), np.stack(labels)


def recalibrate_batchnorm(net: Any, scenes: list[tuple[np.ndarray, np.ndarray]], patch: int | None,
                          pixels: int, rng: np.random.Generator, batch: int = 1) -> int:
    """Recompute every BatchNorm's running statistics with the final weights ("precise BN").

    The trainer's own recalibration (``lrss_ds.engine.batchnorm_recalibration``, which says why
    and what it measured) over ``pixels`` pixels of training samples drawn as in training, the
    same rule for every method. At the default workload (512 px, 64 scenes, 480 CPU-s) it
    matters less than after a short run: patch HRNet mIoU 63.8 with, 56.6 without; EHSNet
    river+lake 81.8 with, 87.1 without (memory_time_target_training.json); it is kept, the
    choice kinder to the patch baseline.

    Args:
        net: the model (its modes are restored afterwards); samples go to its parameters' device.
        scenes: training scenes.
        patch: patch side for patch-trained models, ``None`` for whole scenes.
        pixels: how many input pixels to forward (whole scenes or patches of them).
        rng: sampling generator.
        batch: samples per forward, as in training.

    Returns:
        Batches forwarded.
    """
    import torch

    from lrss_ds.engine.batchnorm_recalibration import recalibrate_batchnorm as recalibrate

    device = model_device(net)

    def batches() -> Any:
        seen = 0
        while seen < pixels:
            image, label = sample(scenes, patch, rng, batch)
            seen += label.size
            yield torch.from_numpy(image).to(device)

    return recalibrate(net, batches()) if pixels > 0 else 0


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


def _band_stats(scenes: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[float], list[float]]:
    """Per-band mean and std over the training scenes (what the model's normaliser gets)."""
    stacked = np.stack([image.reshape(image.shape[0], -1) for image, _ in scenes]).astype(np.float64)
    mean = stacked.mean(axis=(0, 2))
    std = stacked.std(axis=(0, 2)) + 1e-6
    return mean.tolist(), std.tolist()


def evaluate(model: Any, scenes: list[tuple[np.ndarray, np.ndarray]], num_classes: int,
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


def short_train(
    method: str,
    budget_cpu_s: float,
    scene_size: int,
    patch: int,
    train_scenes: int = 6,
    val_scenes: int = 3,
    bands: int = 4,
    seed: int = 0,
    lr: float = 1e-3,
    state_out: str | None = None,
    max_steps: int = 100000,
    water_scale: float = 1.0,
    bn_scenes: float = 8.0,
    patch_batch: int = 8,
) -> dict[str, Any]:
    """Train ``method`` on synthetic scenes for a budget of process CPU seconds, then evaluate.

    CPU seconds (not wall-clock) bound the training so that methods compared on a shared,
    contended machine get the same amount of computation; on an idle machine with all cores
    busy the two are proportional. Sampling: a random training scene per step, whole
    (holistic methods) or ``patch_batch`` random ``patch`` crops (patch methods: a mini-batch,
    as patch baselines are trained; one 64 px patch per step leaves HRNet's stride-32 branch
    2x2 positions for BatchNorm and its river/lake IoU near 0 after 90 CPU-s), randomly
    flipped or turned by right angles (``augment``). The engine and the step are the trainer's
    (``lrss_ds.engine.setup.build_step_parts``: AdamW at ``lr``, ``ds_configs/cpu.json``, memory
    mode ``none``; ``lrss_ds.engine.trainer.train_step``), the same for every method. After training, BatchNorm statistics are recomputed
    with the final weights over ``bn_scenes`` scenes' worth of training pixels
    (``recalibrate_batchnorm``, the trainer's ``train.recalibrate_bn`` mechanism; its CPU time is reported apart, ``bn_cpu_s``, and is a few
    percent of the budget). Many training scenes matter for the holistic methods: each step
    sees one whole scene, and with 4 scenes they memorised them (HRNet-FCN holistic, 256 px:
    river/lake IoU 94/88 on its training scenes, 41/0 on unseen ones).

    Args:
        method: a ``METHODS`` label.
        budget_cpu_s: CPU seconds of training (setup and evaluation excluded).
        scene_size: square scene side.
        patch: patch side for patch training / local inference / GLNet-GLSNet crops.
        train_scenes: scenes trained on (rendered before the budget starts).
        val_scenes: scenes evaluated on (other seeds' layouts than the training scenes).
        bands: input bands.
        seed: data and torch seed.
        lr: learning rate.
        state_out: if given, the trained state dict and its ``config`` are saved there.
        max_steps: stop after this many steps even if budget remains.
        water_scale: ``make_layout``'s factor on river width and lake radii.
        bn_scenes: scenes' worth of pixels forwarded to recompute BatchNorm statistics (0: keep
            the running averages of training).
        patch_batch: patches per step of patch methods.

    Returns:
        ``miou``, ``iou`` per class, ``river_lake_miou`` (mean of the two), ``steps``,
        ``train_cpu_s``, ``train_wall_s``, ``train_s_per_image`` (wall per image-equivalent),
        ``bn_cpu_s``, ``bn_samples``, ``test_s``, ``inference`` (``"local"``/``"global"``),
        ``final_loss``, ``loss_curve`` (mean loss per tenth of the steps).
    """
    import torch

    from lrss_ds.engine.config import (
        DeepSpeedConfigRef,
        ExperimentConfig,
        LossConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
    )
    from lrss_ds.engine.setup import build_step_parts, init_distributed, load_deepspeed_json
    from lrss_ds.engine.trainer import train_step
    from lrss_ds.models import build_model

    spec = METHODS[method]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train = synthetic_scenes(train_scenes, scene_size, bands, seed, water_scale)
    val = synthetic_scenes(val_scenes, scene_size, bands, seed + 1000, water_scale)
    mean, std = _band_stats(train)
    num_classes = len(_class_names())
    options = options_for(spec, patch)
    init_distributed()
    repo = Path(__file__).resolve().parents[1]
    config = ExperimentConfig(
        model=ModelConfig(name=spec.model, options=options),
        optim=OptimConfig(type="adamw", lr=lr, weight_decay=1e-4),
        loss=LossConfig(name=spec.loss),
        deepspeed=DeepSpeedConfigRef(config=str(repo / "ds_configs" / "cpu.json"),
                                     override={"csv_monitor": {"enabled": False}}),  # writes no files
        train=TrainConfig(output=tempfile.gettempdir()),
    )
    net = build_model(spec.model, num_classes, bands, band_mean=mean, band_std=std, **options)
    parts = build_step_parts(net, config, load_deepspeed_json(config), num_classes, 255)
    parts.engine.train()
    start_cpu, start_wall = cpu_seconds(), time.perf_counter()
    steps, pixels, losses = 0, 0, []
    sample_patch = patch if spec.sampling == "patch" else None
    while cpu_seconds() - start_cpu < budget_cpu_s and steps < max_steps:
        batch = patch_batch if sample_patch is not None else 1
        image, label = sample(train, sample_patch, rng, batch)
        loss = train_step(parts, {"image": torch.from_numpy(image), "label": torch.from_numpy(label)})
        if loss is not None:  # a non-finite loss: the step dropped the micro-batch
            losses.append(loss)
        steps += 1
        pixels += int(label.size)
    train_cpu, train_wall = cpu_seconds() - start_cpu, time.perf_counter() - start_wall
    net = parts.engine.module
    bn_start = cpu_seconds()
    bn_samples = recalibrate_batchnorm(net, train, sample_patch, int(bn_scenes * scene_size * scene_size), rng,
                                       patch_batch if sample_patch is not None else 1)
    bn_cpu = cpu_seconds() - bn_start
    net.eval()
    window = patch if spec.sampling == "patch" else None
    scores = evaluate(net, val, num_classes, window, patch // 4 if window else 0)
    if state_out:
        torch.save({"config": net.config(), "state_dict": net.state_dict()}, state_out)
    river_lake = [scores["iou"].get(name) for name in RIVER_LAKE]
    images_seen = pixels / float(scene_size * scene_size)
    return {
        **scores,
        "method": method,
        "river_lake_miou": None if None in river_lake else float(np.mean(river_lake)),
        "steps": steps,
        "train_cpu_s": train_cpu,
        "train_wall_s": train_wall,
        "train_s_per_image": train_wall / max(images_seen, 1e-9),
        "inference": "local" if window else "global",
        "final_loss": losses[-1] if losses else float("nan"),
        "loss_curve": [float(np.mean(part)) for part in np.array_split(np.asarray(losses), min(10, len(losses)))]
        if losses else [],
        "bn_cpu_s": bn_cpu,
        "bn_samples": bn_samples,
        "water_scale": water_scale,
        "patch_batch": patch_batch if sample_patch is not None else None,
        "scene_size": scene_size,
        "patch": patch,
        "options": options,
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
        state: ``short_train``'s saved state; without it the weights are random and ``miou``
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
    scores = evaluate(net, data, num_classes, window, patch // 4 if window else 0)
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
    ``short_train``'s format so the inference probes can load them.

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
    scores = evaluate(model, val, model.num_classes, window, predictor.overlap)
    if state_out:
        torch.save({"config": model.config(), "state_dict": model.state_dict()}, state_out)
    river_lake = [scores["iou"].get(name) for name in RIVER_LAKE]
    return {**scores, "river_lake_miou": None if None in river_lake else float(np.mean(river_lake)),
            "inference": "local" if predictor.window else "global"}
