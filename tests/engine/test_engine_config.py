"""Experiment config: validation errors name the dotted key; overrides; resolved config round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrss_ds.engine.config import ExperimentConfig, load_config, parse_overrides, save_config, to_dict
from lrss_ds.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


GOOD = """
model: {name: hrnet_fcn, options: {backbone: hrnet_w18}}
data: {store: stores/x, mode: whole}
optim: {type: sgd, lr: 0.01, head_lr_mult: 10}
schedule: {warmup_iters: 15, warmup_lr: 5.0e-5, milestones: [50, 80]}
train: {iterations: 100}
deepspeed: {config: cpu.json}
"""


def test_good_yaml_loads_with_types(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert isinstance(config, ExperimentConfig)
    assert config.optim.type == "sgd" and config.optim.head_lr_mult == 10.0
    assert isinstance(config.optim.head_lr_mult, float)
    assert config.schedule.milestones == [50, 80]
    assert config.model.options == {"backbone": "hrnet_w18"}
    assert config.train.keep_last == 2  # default kept


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("train: {iteratons: 5}", "train.iteratons", "unknown key"),
        ("trian: {iterations: 5}", "trian", "unknown key"),
        ("train: {iterations: five}", "train.iterations", "expected int"),
        ("train: {iterations: 2.5}", "train.iterations", "expected int"),
        ("train: {iterations: true}", "train.iterations", "expected int"),
        ("optim: {lr: fast}", "optim.lr", "expected float"),
        ("optim: {type: lamb}", "optim.type", "must be one of"),
        ("schedule: {milestones: [1, x]}", "schedule.milestones[1]", "expected int"),
        ("memory: {bf16: 1}", "memory.bf16", "expected bool"),
        ("model: [ehsnet]", "model", "expected a mapping"),
        ("train: {iterations: 0}", "train.iterations", "must be positive"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path, "data: {store: s}\n" + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert f": {key}:" in message and problem in message, message


def test_bad_nested_dataclass_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.synthetic\.height: expected int"):
        load_config(write(tmp_path, "data: {store: s, synthetic: {height: big}}"))


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: {iterations: [1,"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="data.store.*required"):
        load_config(write(tmp_path, "train: {iterations: 3}"))


def test_parse_overrides_nested_and_yaml_values() -> None:
    parsed = parse_overrides(["train.iterations=20", "schedule.milestones=[3, 6]", "model.options.k=32",
                              "memory.preset=null", "--optim.lr=1e-4", "train.output=runs/a=b"])
    assert parsed == {
        "train": {"iterations": 20, "output": "runs/a=b"},
        "schedule": {"milestones": [3, 6]},
        "model": {"options": {"k": 32}},
        "memory": {"preset": None},
        "optim": {"lr": "1e-4"},  # YAML 1.1 reads 1e-4 as a string; the float field accepts it
    }
    for bad in ("iterations", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="dotted.key=value"):
            parse_overrides([bad])


def test_overrides_apply_validate_and_roundtrip(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    config = load_config(path, ["train.iterations=20", "optim.lr=1e-4", "model.options.k=32",
                                "deepspeed.override.gradient_accumulation_steps=2"])
    assert config.train.iterations == 20 and config.optim.lr == pytest.approx(1e-4)
    assert config.model.options == {"backbone": "hrnet_w18", "k": 32}
    assert config.deepspeed.override == {"gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError, match="^command line: train.iterations=lots: expected int"):
        load_config(path, ["train.iterations=lots"])
    with pytest.raises(ConfigError, match="^command line: train.itrations=3: unknown key"):
        load_config(path, ["train.itrations=3"])
    # the saved resolved config loads back to the same values, from anywhere
    save_config(config, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert to_dict(again) == {**to_dict(config), "deepspeed": {**to_dict(config)["deepspeed"],
                                                             "config": str((tmp_path / "cpu.json").resolve())}}


@pytest.mark.parametrize(
    ("key", "value"),
    [("optim.lr", "-0.01"), ("optim.lr", "0"), ("optim.lr", ".nan"), ("optim.lr", ".inf"),
     ("optim.group_lrs.local", "-1.0e-5"), ("schedule.warmup_lr", "-1.0e-4"), ("optim.head_lr_mult", "-10")],
)
def test_bad_rates_are_refused_naming_the_key(tmp_path: Path, key: str, value: str) -> None:
    """A negative, zero or NaN learning rate once trained without a word."""
    section, _, name = key.partition(".")
    leaf = name.split(".")
    text = f"{leaf[-1]}: {value}"
    for part in reversed(leaf[:-1]):
        text = f"{part}: {{{text}}}"
    path = write(tmp_path, f"data: {{store: s}}\n{section}: {{{text}}}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: {key}: must be .*positive and finite, got"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"^command line: {key}={value}: must be .*positive"):
        load_config(write(tmp_path, "data: {store: s}"), [f"{key}={value}"])


def test_command_line_errors_name_the_command_line(tmp_path: Path) -> None:
    """An error in a command-line override names the item, not the YAML file it never was in."""
    path = write(tmp_path, GOOD)
    cases = {
        "optim.lr=abc": "expected float",
        "schedule.milestones=[1, x]": "expected int",
        "data.synthetic.height=big": "expected int",
        "train.keep_last=0": "must be positive",
        "model=[x]": "expected a mapping",
        "train.lr=[1,": "value '[1,' is not valid YAML",
        "trainiterations": "an override must look like dotted.key=value",
    }
    for item, problem in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(path, [item])
        assert str(info.value).startswith(f"command line: {item}: {problem}"), str(info.value)
        assert str(path) not in str(info.value)
    config = load_config(path, ["model.options.k=32"])
    assert config.where("model.options.k") == "command line: model.options.k=32"
    assert config.where("model.options.backbone") == f"{path.resolve()}: model.options.backbone"
    assert "overrides" not in to_dict(config) and "source" not in to_dict(config)


def test_shipped_experiments_load() -> None:
    """Every YAML in ds_configs/ is valid and names a DeepSpeed JSON that exists and parses."""
    from lrss_ds.engine.config import deepspeed_json_path

    yamls = sorted((REPO / "ds_configs").glob("*.yaml"))
    assert any(p.name == "ehsnet_synthetic.yaml" for p in yamls)
    for path in yamls:
        config = load_config(path)
        json.loads(deepspeed_json_path(config).read_text())


def test_paper_schedule_and_param_groups() -> None:
    """EHSNet's schedule: 1,500 warm-up its at 5e-5, 0.01 stepped down to 1e-4; heads at 10x."""
    from torch import nn

    from lrss_ds.engine.setup import lr_factor, param_groups

    config = load_config(REPO / "ds_configs" / "ehsnet_fbp.yaml")
    factor = lr_factor(config.schedule, config.optim.lr)
    lrs = [config.optim.lr * factor(i) for i in (0, 1499, 1500, 9999)]
    assert lrs[0] == pytest.approx(5e-5) and lrs[1] == pytest.approx(5e-5)
    assert lrs[2] == pytest.approx(0.01) and lrs[3] == pytest.approx(1e-4)
    assert config.train.iterations == 10_000 and config.optim.type == "sgd" and config.optim.momentum == 0.9

    net = nn.Module()
    net.backbone = nn.Conv2d(3, 4, 1)
    net.head = nn.Conv2d(4, 2, 1)
    net.aux_head = nn.Conv2d(4, 2, 1)
    groups = {g["name"]: g for g in param_groups(net, config.optim)}
    assert groups["base"]["lr"] == pytest.approx(0.01)
    assert groups["base.head"]["lr"] == pytest.approx(0.1)
    assert len(groups["base.head"]["params"]) == 4

    glsnet = load_config(REPO / "ds_configs" / "glsnet_deepglobe.yaml")
    net2 = nn.Module()
    net2.global_branch = nn.Linear(2, 2)
    net2.local_branch = nn.Linear(2, 2)
    lrs2 = {g["name"]: g["lr"] for g in param_groups(net2, glsnet.optim)}
    assert lrs2 == {"global": pytest.approx(1e-4), "local": pytest.approx(2e-5)}
