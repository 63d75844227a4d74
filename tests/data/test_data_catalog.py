"""Tests of the dataset catalog: built-ins, split rules, user YAML validation, round trips."""

from __future__ import annotations

import json

import pytest

from lrss_ds.data.catalog import DatasetSpec, builtin_names, get_dataset
from lrss_ds.errors import ConfigError


def test_builtins_round_trip_through_json() -> None:
    assert set(builtin_names()) == {"fbp", "inria", "deepglobe", "vaihingen", "synthetic"}
    for name in builtin_names():
        spec = get_dataset(name)
        again = DatasetSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert again == spec


def test_builtin_class_tables() -> None:
    fbp = get_dataset("fbp")
    assert fbp.num_classes == 24 and fbp.bands == ["NIR", "R", "G", "B"] and fbp.label_suffix == "_24label"
    assert fbp.label_map[0] == fbp.ignore_index and fbp.label_map[24] == 23
    assert fbp.classes[fbp.label_map[11]] == "river" and fbp.classes[fbp.label_map[13]] == "lake"
    assert fbp.label_stem("GF2_PMS1__L1A0000564539-MSS1") == "GF2_PMS1__L1A0000564539-MSS1_24label"
    inria = get_dataset("inria")
    assert inria.classes == ["background", "building"] and inria.label_map == {0: 0, 255: 1}
    assert get_dataset("deepglobe").num_classes == 7
    vaihingen = get_dataset("vaihingen")
    assert vaihingen.num_classes == 6 and vaihingen.label_encoding == "rgb" and vaihingen.bands == ["NIR", "R", "G"]
    synthetic = get_dataset("synthetic")
    assert "river" in synthetic.classes and "lake" in synthetic.classes


def test_inria_split_is_126_27_27() -> None:
    spec = get_dataset("inria")
    tiles = [f"{city}{i}" for city in ("austin", "chicago", "kitsap", "tyrol-w", "vienna") for i in range(1, 37)]
    counts: dict[str, int] = {}
    for tile in tiles:
        counts[spec.split_of(tile)] = counts.get(spec.split_of(tile), 0) + 1
    assert counts == {"train": 126, "val": 27, "test": 27}
    assert spec.split_of("austin1") == "test" and spec.split_of("chicago24") == "val"


def test_deepglobe_lists_and_stems() -> None:
    spec = get_dataset("deepglobe")
    assert len(spec.splits["train"]) == 454 and len(spec.splits["test"]) == 142
    assert not set(spec.splits["train"]) & set(spec.splits["test"])
    assert spec.split_of("100694_sat") == "train" and spec.split_of("10452_sat") == "test"
    assert spec.split_of("1_sat") == "val"  # not listed: one of the 207 validation images
    assert spec.label_stem("100694_sat") == "100694_mask"


def test_user_yaml_loads_and_validates(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nclasses: [a, b, c]\nignore_index: 255\nlabel_encoding: index\n"
                    "bands: [R, G, B, NIR]\npalette: [[1, 2, 3], [4, 5, 6], [7, 8, 9]]\n")
    spec = get_dataset(path)
    assert spec.num_classes == 3 and spec.num_bands == 4 and spec.palette[2] == (7, 8, 9)

    path.write_text("name: mine\nclasses: [a, b]\nbandz: [R]\n")
    with pytest.raises(ConfigError, match="bandz"):
        get_dataset(path)
    path.write_text("name: mine\nclasses: [a, b]\nignore_index: '255'\n")
    with pytest.raises(ConfigError, match="ignore_index"):
        get_dataset(path)
    path.write_text("name: mine\nclasses: a\n")
    with pytest.raises(ConfigError, match="classes"):
        get_dataset(path)
    path.write_text("name: mine\nclasses: [a, b]\nlabel_encoding: rgb\n")
    with pytest.raises(ConfigError, match="palette"):
        get_dataset(path)
    path.write_text("name: mine\nclasses: [a, b]\npalette: [[0, 0, 0]]\n")
    with pytest.raises(ConfigError, match="palette"):
        get_dataset(path)
    with pytest.raises(ConfigError, match="not a built-in"):
        get_dataset("no_such_dataset")
    with pytest.raises(ConfigError, match="one line|cannot read"):
        get_dataset(tmp_path / "missing.yaml")
