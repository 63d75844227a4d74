"""Memory modes: presets, YAML-style dicts and one-line errors naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lrss_ds.errors import ConfigError
from lrss_ds.memory import MEMORY_PRESETS, MemoryMode, configure_deepspeed_checkpointing, get_memory_mode


def test_presets_are_valid_and_full_has_every_lever() -> None:
    assert {"none", "ckpt_stage", "ckpt_block", "ckpt_offload", "full"} <= set(MEMORY_PRESETS)
    full = get_memory_mode("full")
    assert full.cpu_checkpointing and full.offload_saved_tensors and full.bf16 and full.channels_last
    assert full.checkpointing == "fine" and full.loss_band_rows


def test_from_dict_starts_from_a_preset_and_round_trips() -> None:
    mode = MemoryMode.from_dict({"preset": "ckpt_stage", "bf16": True})
    assert mode.checkpointing == "stage" and mode.bf16
    assert MemoryMode.from_dict(mode.to_dict()) == mode


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"checkpointing": "layer"}, "memory.checkpointing"),
        ({"bf16": "yes"}, "memory.bf16"),
        ({"loss_band_rows": 0}, "memory.loss_band_rows"),
        ({"cpu_checkpointing": True}, "memory.cpu_checkpointing"),
        ({"offload": True}, "memory.offload"),
        ({"preset": "huge"}, "memory.preset"),
    ],
)
def test_bad_values_name_the_key(values: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        MemoryMode.from_dict(values)
    assert str(info.value).startswith(key + ":") and "\n" not in str(info.value)


def test_deepspeed_config_must_agree_with_the_mode() -> None:
    with pytest.raises(ConfigError, match="activation_checkpointing.cpu_checkpointing"):
        configure_deepspeed_checkpointing(False, {"activation_checkpointing": {"cpu_checkpointing": True}})


def test_cpu_checkpointing_from_the_deepspeed_json_runs_on_the_cpu_accelerator(tmp_path: Path) -> None:
    """DeepSpeed's own cpu_checkpointing crashes on CPU; configured through us it trains."""
    script = textwrap.dedent(
        f"""
        import torch, torch.distributed as dist, deepspeed
        from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt
        from lrss_ds.memory import MemoryMode, apply_memory_mode, prepare_model
        from tests.memory.toy import ToySegmented, toy_loss
        dist.init_process_group("gloo", store=dist.FileStore("{tmp_path}/store", 1), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend="gloo")
        ds_config = {{"train_batch_size": 1, "activation_checkpointing": {{"cpu_checkpointing": True}}}}
        mode = MemoryMode(checkpointing="stage", cpu_checkpointing=True)
        torch.manual_seed(0)
        model = ToySegmented().train()
        prepare_model(model, mode, ds_config)
        assert ds_ckpt.CPU_CHECKPOINT is False
        image = torch.randint(0, 256, (1, 4, 32, 32), dtype=torch.uint8)
        label = torch.randint(0, 3, (1, 32, 32), dtype=torch.uint8)
        with apply_memory_mode(model, mode):
            toy_loss(model(image), label).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        print("OK")
        """
    )
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-2000:]


def test_bf16_autocast_refuses_a_bf16_deepspeed_config() -> None:
    from lrss_ds.memory import prepare_model
    from tests.memory.toy import ToySegmented

    with pytest.raises(ConfigError, match="bf16.enabled"):
        prepare_model(ToySegmented(), get_memory_mode("fullres_bf16"), {"bf16": {"enabled": True}})
