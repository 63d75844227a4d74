"""The patch baselines' training probe: one timed step is one pass over the tiles of an image.

The planner's probe (``lrss_ds.engine.probe.probe_training_step``) trains on whole samples;
a patch-trained baseline sees an image as non-overlapping ``patch_size`` tiles, taken in
micro-batches of ``patch_batch`` tiles with one optimizer step each (the batch `lrss-ds train`
gives these methods in the benchmarks: ``_workloads.PATCH_BATCH``; smp's PSPNet, DeepLabV3+ and
UPerNet normalise a globally pooled 1 x 1 map, which BatchNorm cannot train on one sample), so its
``step_s`` is the training time per image. Same engine, same step (the
trainer's), same measurements (``lrss_ds.engine.probe.measure_steps``); only the micro-batches
differ. Run in a fresh process by ``memory_time.train_probe``.
"""

from __future__ import annotations

from typing import Any


def patch_training_step(
    model: str,
    height: int,
    width: int,
    mode: str,
    patch_size: int,
    patch_batch: int,
    steps: int = 2,
    bands: int = 4,
    num_classes: int = 6,
    model_options: dict[str, Any] | None = None,
    loss: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train on the ``patch_size`` tiles of one random ``height x width`` image, ``steps`` passes.

    Args:
        model: a ``MODEL_BUILDERS`` name.
        height: image height H.
        width: image width W.
        mode: a ``PLAN_SETUPS`` name.
        patch_size: tile side; edge tiles are cut to the image.
        patch_batch: tiles per optimizer step (tiles of one shape together, in image order).
        steps: passes over the tiles (see ``measure_steps``).
        bands: input bands C.
        num_classes: classes K.
        model_options: extra ``build_model`` options.
        loss: a ``build_loss`` name (default as the planner's probe chooses).
        seed: torch seed.

    Returns:
        ``measure_steps``' dict plus ``model``, ``mode``, ``height``, ``width``, ``pixels``.
    """
    import torch

    from lrss_ds.engine.probe import measure_steps, probe_step_parts, random_sample

    parts = probe_step_parts(model, mode, bands, num_classes, model_options, loss, seed)
    sample = random_sample(bands, height, width, num_classes, parts.engine.device)
    tiles = [
        (sample["image"][:, :, r : r + patch_size, c : c + patch_size], sample["label"][:, r : r + patch_size, c : c + patch_size])
        for r in range(0, height, patch_size)
        for c in range(0, width, patch_size)
    ]
    by_shape: dict[tuple[int, ...], list[tuple[Any, Any]]] = {}
    for image, label in tiles:
        by_shape.setdefault(tuple(image.shape), []).append((image, label))
    batches = [
        {"image": torch.cat([image for image, _ in group[i : i + patch_batch]]),
         "label": torch.cat([label for _, label in group[i : i + patch_batch]])}
        for group in by_shape.values()
        for i in range(0, len(group), patch_batch)
    ]
    measured = measure_steps(parts, batches, steps)
    return {"model": model, "mode": mode, "height": height, "width": width, "pixels": height * width, **measured}
