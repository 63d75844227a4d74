"""``parallel.spatial`` in the experiment YAML: validated on load, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrss_ds.engine.config import load_config
from lrss_ds.errors import ConfigError

BASE = """
model: {{name: {model}, options: {{{options}}}}}
data: {{store: stores/x, mode: {mode}}}
deepspeed: {{config: cpu.json}}
parallel: {{spatial: {spatial}}}
{extra}
"""


def _load(
    tmp_path: Path, spatial: object, model: str = "hrnet_fcn", options: str = "", mode: str = "whole", extra: str = ""
) -> object:
    path = tmp_path / "exp.yaml"
    path.write_text(BASE.format(model=model, options=options, mode=mode, spatial=spatial, extra=extra))
    return load_config(path)


def test_one_rank_per_scene_is_the_default(tmp_path: Path) -> None:
    assert _load(tmp_path, 1).parallel.spatial == 1  # type: ignore[attr-defined]


def test_spatial_runs_with_a_supported_model_on_whole_scenes(tmp_path: Path) -> None:
    assert _load(tmp_path, 2, "ehsnet").parallel.spatial == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("spatial, model, options, mode, words", [
    (0, "hrnet_fcn", "", "whole", "must be positive"),
    ("two", "hrnet_fcn", "", "whole", "expected int"),
    (2, "glsnet", "", "whole", "model 'glsnet' has no spatial version"),
    (2, "hrnet_fcn", "mode: downsampled", "whole", "needs model mode holistic"),
    (2, "ehsnet", "", "patch", "data.mode is 'patch'"),
])
def test_bad_spatial_settings_are_refused_naming_the_key(
    tmp_path: Path, spatial: object, model: str, options: str, mode: str, words: str
) -> None:
    with pytest.raises(ConfigError, match=words) as error:
        _load(tmp_path, spatial, model, options, mode)
    assert "parallel.spatial" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("train, words", [
    ("{augment: d4}", "train.augment is 'd4'"),
    ("{recalibrate_bn: 2}", "train.recalibrate_bn forwards whole scenes on each rank"),
])
def test_training_features_that_need_the_whole_scene_on_one_rank_are_refused(tmp_path: Path, train: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as error:
        _load(tmp_path, 2, "ehsnet", extra=f"train: {train}")
    assert "parallel.spatial" in str(error.value) and "\n" not in str(error.value)
