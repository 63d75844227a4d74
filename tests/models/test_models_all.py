"""Contract tests of every model in MODEL_BUILDERS: sizes, outputs per mode, gradients, seeds, plans."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lrss_ds.models import MODEL_BUILDERS, build_model
from lrss_ds.models.base import GRANULARITIES, SegmentationModel, set_segment_runner, upsample_logits
from tests.models.test_models_smp import skip_if_unavailable

# Light options per model so the whole file runs in seconds; the architecture is the same.
SMALL: dict[str, dict[str, Any]] = {
    "ehsnet": {"lrd_k": 32, "lrd_d": 32, "dw_kernels": (3, 7)},
    "hrnet_fcn": {},
    "glsnet": {"crop_size": 64, "d_model": 32},
    "glnet": {"crop_size": 64, "global_size": 64, "fpn_width": 32},
    # gate_init != 0: the paper's zero gates give the RAF's relation MLPs no gradient on the
    # first step (by design); a non-zero gate lets this test see that they are connected.
    "isdnet": {"channels": 32, "shallow_base": 16, "relation_groups": 4, "gate_init": 0.5},
    "stdc": {"base": 16, "context_channels": 32},
    "magnet": {"crop_size": 64, "depth": 18, "fpn_width": 32},
    "fctl": {"crop_size": 64, "depth": 18, "fpn_width": 32, "corr_width": 32, "key_width": 16},
    "smp": {"arch": "unet", "encoder": "resnet18"},
    "tv_fcn": {},
    "segnet": {"width": 16},
    "icnet": {"backbone": "resnet18"},
    "fcn8s": {"width": 16, "fc_channels": 64},
    "transunet": {"resnet_depth": 18, "hidden": 32, "layers": 2, "heads": 2, "mlp": 64},
}
# Train-mode outputs beyond the contract's, read by the models' auxiliary loss terms.
EXTRA_OUTPUTS: dict[str, set[str]] = {"isdnet": {"sr", "affinity"}, "stdc": {"detail"}}
CLASSES, BANDS = 3, 4
# Odd sizes (not multiples of any stride); the paper's model gets the larger one.
EVAL_SIZE: dict[str, tuple[int, int]] = {"ehsnet": (97, 131)}
SMALL_ODD = (45, 67)


def _model(name: str, seed: int = 0) -> SegmentationModel:
    skip_if_unavailable(name)
    torch.manual_seed(seed)
    return build_model(name, CLASSES, BANDS, band_mean=[100.0] * BANDS, band_std=[50.0] * BANDS, **SMALL.get(name, {}))


def test_every_registered_model_has_small_options() -> None:
    assert set(MODEL_BUILDERS) >= {"ehsnet", "hrnet_fcn"}
    assert set(SMALL) >= set(MODEL_BUILDERS), "add light options for new models here"


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_train_outputs_gradients_and_plans(name: str) -> None:
    """Train mode: the output dict, gradients to every parameter, plans naming real segments."""
    model = _model(name)
    model.train()
    stack: list[str] = []
    seen: list[str] = []
    at_normalizer: list[tuple[str, ...]] = []

    def runner(segment: str, fn, *args):
        seen.append(segment)
        stack.append(segment)
        try:
            return fn(*args)
        finally:
            stack.pop()

    set_segment_runner(model, runner)
    model.normalizer.register_forward_pre_hook(lambda mod, args: at_normalizer.append(tuple(stack)))
    x = torch.randint(0, 256, (1, BANDS, 70, 90), dtype=torch.uint8)
    out = model(x)
    assert set(out) == {"logits", "aux", "input_size", "padded_size"} | EXTRA_OUTPUTS.get(name, set())
    assert out["input_size"] == (70, 90)
    hp, wp = out["padded_size"]
    assert hp >= 70 and wp >= 90
    assert out["logits"].shape == (1, CLASSES, hp // model.output_stride, wp // model.output_stride)
    maps = [out["logits"], *out["aux"]]
    torch.manual_seed(1)
    loss = sum(
        (upsample_logits(m, out["padded_size"], out["input_size"]) * torch.randn(1, CLASSES, 70, 90)).mean()
        for m in maps
    )
    extras = [t for key in EXTRA_OUTPUTS.get(name, ()) for t in (out[key] if isinstance(out[key], tuple) else [out[key]])]
    loss = loss + sum((t * torch.randn_like(t)).mean() for t in extras if t.requires_grad)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead[:5]}"
    assert at_normalizer, "the model must call its normaliser"
    for granularity in GRANULARITIES:
        plan = model.checkpoint_plan(granularity)
        assert plan <= set(seen), (granularity, sorted(plan - set(seen)))
        assert not any(b.startswith(a + ".") for a in plan for b in plan), granularity
        # uint8 stays uint8 until inside a checkpoint: the normaliser runs inside a planned segment
        assert all(any(s in plan for s in ctx) for ctx in at_normalizer), (granularity, at_normalizer)


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_eval_output_is_the_upsampled_train_logits_and_deterministic(name: str) -> None:
    """Eval mode returns (B, K, H, W) at an odd size, equal to upsample_logits of the logits."""
    height, width = EVAL_SIZE.get(name, SMALL_ODD)
    model = _model(name)
    twin = _model(name)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    torch.manual_seed(2)
    x = torch.rand(1, BANDS, height, width) * 255
    model.eval()
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (1, CLASSES, height, width) and logits.dtype == torch.float32
        assert torch.equal(logits, twin.eval()(x))
        model.train()
        for child in model.children():  # train-mode output dict, eval-mode BatchNorm
            child.eval()
        out = model(x)
    assert torch.allclose(upsample_logits(out["logits"], out["padded_size"], out["input_size"]), logits, atol=1e-5)


def test_large_odd_size_ehsnet_defaults() -> None:
    """The paper's EHSNet (defaults) on a 517x611 input: padded inside, cropped back."""
    torch.manual_seed(0)
    model = build_model("ehsnet", 5, 4).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 4, 517, 611), dtype=torch.uint8))
    assert logits.shape == (1, 5, 517, 611) and torch.isfinite(logits).all()
