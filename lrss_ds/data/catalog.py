"""Dataset descriptions (classes, palette, bands, label encoding, splits) as validated data."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lrss_ds.data import catalog_lists
from lrss_ds.errors import ConfigError

Colour = tuple[int, int, int]


@dataclass
class DatasetSpec:
    """What a dataset's rasters mean: class table, label encoding, band layout and split rule.

    Args:
        name: dataset name, recorded in stores and checkpoints.
        classes: class names; a label value ``k`` (after ``label_map``) means ``classes[k]``.
        palette: one RGB triple per class, for drawing maps and for decoding RGB-coded labels.
        ignore_index: the label value that marks pixels without a class (never a class index).
        label_encoding: ``"index"`` (single-band class values) or ``"rgb"`` (colours of
            ``palette``, plus ``ignore_colours``).
        bands: band names in the order the image files hold them; its length is the band count.
        label_suffix: label file stem = image stem minus ``image_suffix`` plus this
            (FBP ``"_24label"``, DeepGlobe ``"_mask"``).
        image_suffix: part of the image stem that the label stem does not share (DeepGlobe
            ``"_sat"``). The scene id is always the whole image stem.
        label_map: raw label value -> stored value (a class index or ``ignore_index``), for
            index labels that are not already ``0..K-1``; when given, only its keys are valid.
        ignore_colours: RGB colours of RGB-coded labels stored as ``ignore_index``.
        rgb_threshold: for RGB-coded labels whose palette uses only 0 and 255 per channel but
            whose files were lossily compressed: channel values >= this become 255, the rest 0,
            before the palette lookup (DeepGlobe: 128, its organisers' advice).
        splits: split name -> scene ids listed for it.
        default_split: split of scenes no list names.
        description: one line on the source and conventions.
    """

    name: str
    classes: list[str]
    palette: list[Colour] | None = None
    ignore_index: int = 255
    label_encoding: str = "index"
    bands: list[str] = field(default_factory=lambda: ["R", "G", "B"])
    label_suffix: str = ""
    image_suffix: str = ""
    label_map: dict[int, int] | None = None
    ignore_colours: list[Colour] = field(default_factory=list)
    rgb_threshold: int | None = None
    splits: dict[str, list[str]] = field(default_factory=dict)
    default_split: str = "train"
    description: str = ""
    source: InitVar[str | None] = None  # what errors name: the YAML file the values came from

    def __post_init__(self, source: str | None) -> None:
        self.validate(source)

    @property
    def num_classes(self) -> int:
        """Number of classes ``K`` (stored label values are ``0..K-1`` or ``ignore_index``)."""
        return len(self.classes)

    @property
    def num_bands(self) -> int:
        """Number of image bands the dataset's image files hold."""
        return len(self.bands)

    def split_of(self, scene_id: str) -> str:
        """Return the split a scene belongs to by this dataset's split rule."""
        for split, ids in self.splits.items():
            if scene_id in ids:
                return split
        return self.default_split

    def label_stem(self, image_stem: str) -> str:
        """Return the label file stem that belongs to the image file stem ``image_stem``."""
        base = image_stem
        if self.image_suffix and base.endswith(self.image_suffix):
            base = base[: -len(self.image_suffix)]
        return base + self.label_suffix

    def validate(self, where: str | None = None) -> None:
        """Check the values are consistent.

        Args:
            where: what to name in errors (a YAML path); default ``dataset '<name>'``.

        Raises:
            ConfigError: naming the offending key.
        """
        where = where or f"dataset '{self.name}'"
        if not self.classes:
            raise ConfigError(f"{where}: classes", "must list at least one class name")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"{where}: classes", "class names must be unique")
        if not 0 <= self.ignore_index <= 255 or self.ignore_index < len(self.classes):
            raise ConfigError(
                f"{where}: ignore_index",
                f"must be in {len(self.classes)}..255 (labels are uint8 and 0..{len(self.classes) - 1} "
                "are classes)",
            )
        if self.label_encoding not in ("index", "rgb"):
            raise ConfigError(f"{where}: label_encoding", "must be 'index' or 'rgb'")
        if self.palette is not None:
            if len(self.palette) != len(self.classes):
                raise ConfigError(
                    f"{where}: palette",
                    f"has {len(self.palette)} colours for {len(self.classes)} classes",
                )
            for colour in list(self.palette) + list(self.ignore_colours):
                if len(colour) != 3 or not all(0 <= int(v) <= 255 for v in colour):
                    raise ConfigError(f"{where}: palette", f"{colour} is not an RGB triple 0..255")
            if len({tuple(c) for c in self.palette}) != len(self.palette):
                raise ConfigError(f"{where}: palette", "colours must be unique")
        if self.label_encoding == "rgb" and self.palette is None:
            raise ConfigError(f"{where}: palette", "is required when label_encoding is 'rgb'")
        if not self.bands:
            raise ConfigError(f"{where}: bands", "must name at least one band")
        if self.rgb_threshold is not None and not 1 <= self.rgb_threshold <= 255:
            raise ConfigError(f"{where}: rgb_threshold", "must be in 1..255")
        if self.label_map is not None:
            for raw, value in self.label_map.items():
                if value != self.ignore_index and not 0 <= value < len(self.classes):
                    raise ConfigError(
                        f"{where}: label_map", f"{raw} -> {value} is neither a class nor ignore_index"
                    )

    def to_dict(self) -> dict[str, Any]:
        """Return plain JSON/YAML-able values; ``DatasetSpec.from_dict`` inverts it."""
        out = dataclasses.asdict(self)
        out["palette"] = None if self.palette is None else [list(c) for c in self.palette]
        out["ignore_colours"] = [list(c) for c in self.ignore_colours]
        # JSON object keys are strings: keep label_map as pairs so it round-trips unchanged.
        out["label_map"] = None if self.label_map is None else [[k, v] for k, v in self.label_map.items()]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "dataset") -> DatasetSpec:
        """Build and validate a spec from plain values (a YAML file or ``to_dict()`` output).

        Args:
            values: mapping of field names to values; ``name`` and ``classes`` are required.
            where: what to name in errors (the YAML file path).

        Returns:
            The validated spec.

        Raises:
            ConfigError: unknown key, missing key or wrong type, naming the key.
        """
        if not isinstance(values, dict):
            raise ConfigError(where, "must be a mapping of dataset keys to values")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{where}: {key}", f"unknown key (known: {', '.join(sorted(known))})")
        for key in ("name", "classes"):
            if key not in values:
                raise ConfigError(f"{where}: {key}", "is required")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            kwargs[key] = _convert(key, value, where)
        return cls(**kwargs, source=where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_list(key: str, value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key}", "must be a list of strings")
    return list(value)


def _colours(key: str, value: Any, where: str) -> list[Colour]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {key}", "must be a list of [R, G, B] triples")
    out = []
    for colour in value:
        if not isinstance(colour, (list, tuple)) or len(colour) != 3 or not all(_is_int(v) for v in colour):
            raise ConfigError(f"{where}: {key}", f"{colour!r} is not an [R, G, B] triple of integers")
        out.append((int(colour[0]), int(colour[1]), int(colour[2])))
    return out


def _convert(key: str, value: Any, where: str) -> Any:
    """Type-check one YAML value and convert it to the field's Python type."""
    if key in ("name", "label_encoding", "label_suffix", "image_suffix", "default_split", "description"):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}", f"must be a string, not {type(value).__name__}")
        return value
    if key in ("classes", "bands"):
        return _str_list(key, value, where)
    if key == "rgb_threshold" and value is None:
        return None
    if key in ("ignore_index", "rgb_threshold"):
        if not _is_int(value):
            raise ConfigError(f"{where}: {key}", f"must be an integer, not {type(value).__name__}")
        return value
    if key == "palette":
        return None if value is None else _colours(key, value, where)
    if key == "ignore_colours":
        return _colours(key, value, where)
    if key == "label_map":
        if value is None:
            return None
        pairs = value.items() if isinstance(value, dict) else value
        try:
            out = {}
            for raw, mapped in pairs:
                if not (_is_int(raw) or (isinstance(raw, str) and raw.isdigit())) or not _is_int(mapped):
                    raise ValueError
                out[int(raw)] = mapped
            return out
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key}", "must map integer label values to integers") from None
    if key == "splits":
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}", "must map split names to lists of scene ids")
        return {str(name): _str_list(f"{key}.{name}", ids, where) for name, ids in value.items()}
    raise ConfigError(f"{where}: {key}", "unknown key")  # unreachable: keys are checked first


# --------------------------------------------------------------------------------------------
# The built-in catalog: plain values, one entry per dataset, read by DatasetSpec.from_dict.
# --------------------------------------------------------------------------------------------

# FBP / Five-Billion-Pixels (Tong et al. 2023; GID-24 class system). Raw labels hold 0..24 with
# 0 = unlabeled. Decision: 0 is not a class but ignore (255), and 1..24 become 0..23, so models
# have exactly the 24 classes the papers report (EHSNet's mIoU is over 24 classes) and unlabeled
# pixels never count in the loss or the metrics. The palette is FBP's own colour code.
_FBP_TABLE = [
    ("industrial area", (200, 0, 0)), ("paddy field", (0, 200, 0)),
    ("irrigated field", (150, 250, 0)), ("dry cropland", (150, 200, 150)),
    ("garden land", (200, 0, 200)), ("arbor forest", (150, 0, 250)),
    ("shrub forest", (150, 150, 250)), ("park", (200, 150, 200)),
    ("natural meadow", (250, 200, 0)), ("artificial meadow", (200, 200, 0)),
    ("river", (0, 0, 200)), ("urban residential", (250, 0, 150)),
    ("lake", (0, 150, 200)), ("pond", (0, 200, 250)), ("fish pond", (150, 200, 250)),
    ("snow", (250, 250, 250)), ("bareland", (200, 200, 200)),
    ("rural residential", (200, 150, 150)), ("stadium", (250, 200, 150)),
    ("square", (150, 150, 0)), ("road", (250, 150, 150)), ("overpass", (250, 150, 0)),
    ("railway station", (250, 200, 250)), ("airport", (200, 150, 0)),
]

BUILTIN_DATASETS: dict[str, dict[str, Any]] = {
    "fbp": {
        "name": "fbp",
        "classes": [name for name, _ in _FBP_TABLE],
        "palette": [list(colour) for _, colour in _FBP_TABLE],
        "ignore_index": 255,
        "label_encoding": "index",
        "bands": ["NIR", "R", "G", "B"],
        "label_suffix": "_24label",
        "label_map": {0: 255, **{k: k - 1 for k in range(1, 25)}},
        # EHSNet keeps FBP's own 30 test scenes and draws 90/30 train/val from the rest; that
        # list is not published, so scenes go to --split at ingest (default train).
        "splits": {},
        "default_split": "train",
        "description": "Five-Billion-Pixels: 150 Gaofen-2 scenes ~6800x7200, 4 m, NIR-R-G-B, "
        "24 classes; raw 0 = unlabeled -> ignore, 1..24 -> 0..23",
    },
    "inria": {
        "name": "inria",
        "classes": ["background", "building"],
        "palette": [[0, 0, 0], [255, 255, 255]],
        "ignore_index": 255,
        "label_encoding": "index",
        "bands": ["R", "G", "B"],
        "label_suffix": "",
        "label_map": {0: 0, 255: 1},
        "splits": {"val": list(catalog_lists.INRIA_VAL), "test": list(catalog_lists.INRIA_TEST)},
        "default_split": "train",
        "description": "Inria Aerial Image Labeling: 180 labelled 5000x5000 RGB tiles, 0.3 m; "
        "gt 0/255 -> 0/1; GLNet/FCtL split 126/27/27 (lists from FCtL txt_1)",
    },
    "deepglobe": {
        "name": "deepglobe",
        # GLNet's 7-class convention: "unknown" is class 0 and is trained; GLNet reports mIoU
        # over the other six.
        "classes": ["unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren"],
        "palette": [[0, 0, 0], [0, 255, 255], [255, 255, 0], [255, 0, 255], [0, 255, 0],
                    [0, 0, 255], [255, 255, 255]],
        "ignore_index": 255,
        "label_encoding": "rgb",
        # The masks are PNGs, but some were saved from lossy images: threshold at 128.
        "rgb_threshold": 128,
        "bands": ["R", "G", "B"],
        "image_suffix": "_sat",
        "label_suffix": "_mask",
        "splits": {
            "train": [f"{i}_sat" for i in catalog_lists.DEEPGLOBE_TRAIN],
            "test": [f"{i}_sat" for i in catalog_lists.DEEPGLOBE_TEST],
        },
        "default_split": "val",
        "description": "DeepGlobe land cover: 803 labelled 2448x2448 RGB images, colour-coded "
        "labels; GLNet lists 454 train / 207 val (the rest) / 142 test",
    },
    "vaihingen": {
        "name": "vaihingen",
        "classes": ["impervious surfaces", "building", "low vegetation", "tree", "car", "clutter"],
        "palette": [[255, 255, 255], [0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0],
                    [255, 0, 0]],
        "ignore_index": 255,
        "label_encoding": "rgb",
        # Black marks the eroded boundaries of ISPRS's "no boundary" ground truth.
        "ignore_colours": [[0, 0, 0]],
        "bands": ["NIR", "R", "G"],
        "label_suffix": "",
        # The ISPRS benchmark's 16 training tiles; the other 17 are its test tiles.
        "splits": {
            "train": [f"top_mosaic_09cm_area{i}" for i in
                      (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)],
        },
        "default_split": "test",
        "description": "ISPRS Vaihingen: 33 tiles ~2500x2000 IRRG, 9 cm, 6 classes, RGB labels; "
        "ISPRS 16 train / 17 test",
    },
    "synthetic": {
        "name": "synthetic",
        # "river" and "lake" share one water texture; only shape and extent tell them apart.
        "classes": ["background", "field", "road", "building", "river", "lake"],
        "palette": [[190, 170, 130], [90, 160, 60], [120, 120, 120], [220, 60, 50],
                    [30, 60, 200], [40, 170, 230]],
        "ignore_index": 255,
        "label_encoding": "index",
        "bands": ["NIR", "R", "G", "B"],
        "label_suffix": "",
        "splits": {},
        "default_split": "train",
        "description": "lrss-ds synth scenes: river vs lake needs long-range context",
    },
}


def builtin_names() -> list[str]:
    """Return the names of the built-in datasets."""
    return sorted(BUILTIN_DATASETS)


def get_dataset(name_or_yaml_path: str | Path) -> DatasetSpec:
    """Return a built-in dataset by name, or load and validate a user's dataset YAML.

    Args:
        name_or_yaml_path: a built-in name (``fbp``, ``inria``, ``deepglobe``, ``vaihingen``,
            ``synthetic``) or the path of a YAML file with keys ``name``, ``classes``,
            ``palette`` (optional), ``ignore_index``, ``label_encoding``, ``bands`` and the
            optional keys of ``DatasetSpec``.

    Returns:
        The validated spec (a fresh object; callers may change it).

    Raises:
        ConfigError: unknown name, unreadable YAML, unknown key or wrong type.
    """
    text = str(name_or_yaml_path)
    if text in BUILTIN_DATASETS:
        return DatasetSpec.from_dict(copy.deepcopy(BUILTIN_DATASETS[text]), where=f"dataset '{text}'")
    path = Path(text)
    if path.suffix.lower() not in (".yaml", ".yml") and not path.exists():
        raise ConfigError(
            text, f"not a built-in dataset ({', '.join(builtin_names())}) nor a dataset YAML file"
        )
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(path, f"cannot read dataset YAML: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(path, f"invalid YAML{at}: {problem}") from None
    return DatasetSpec.from_dict(values, where=str(path))
