"""The experiment YAML's ``memory:`` section follows ``MemoryMode``: a new lever is one field there."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import pytest

import lrss_ds.engine.config as config
from lrss_ds.errors import ConfigError
from lrss_ds.memory import MemoryMode


@dataclass(frozen=True)
class _ModeWithLever(MemoryMode):
    """A memory mode with one more lever, as a contributor would add it."""

    tile_rows: int | None = None


def test_a_new_memory_mode_field_is_a_key_of_the_memory_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "MemoryMode", _ModeWithLever)
    section = config._memory_config()
    names = [f.name for f in dataclasses.fields(section)]
    assert names == ["preset", *(f.name for f in dataclasses.fields(MemoryMode)), "tile_rows"]
    assert typing.get_type_hints(section)["tile_rows"] == int | None
    assert config._build(section, {"tile_rows": 64}, "memory").tile_rows == 64
    with pytest.raises(ConfigError, match=r"memory\.tile_rows: expected int, got 'many'"):
        config._build(section, {"tile_rows": "many"}, "memory")

