"""Bad ingest inputs reach the user as one line naming the file: damaged GeoTIFF blocks, dataset YAML errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from lrss_ds.cli import main
from tests.data.data_helpers import user_dataset_yaml, write_raster


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str], starts: str, *fragments: str) -> str:
    """Run ``lrss-ds argv``; assert exit 1 and one error line whose message starts with ``starts``."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    prefix = f"lrss-ds {argv[0]}: error: "
    assert "\n" not in err and err.startswith(prefix + starts), err
    for fragment in fragments:
        assert fragment in err, err
    assert "See previous exception" not in err and "Traceback" not in err, err
    return err


def test_a_truncated_tiled_geotiff_is_named_without_gdal_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    image = tmp_path / "img" / "scene.tif"
    image.parent.mkdir()
    profile = dict(driver="GTiff", height=512, width=512, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=Affine(4.0, 0.0, 400000.0, 0.0, -4.0, 5300000.0), tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate")
    with rasterio.open(image, "w", **profile) as dst:
        dst.write(rng.integers(0, 255, size=(3, 512, 512)).astype("uint8"))
    with open(image, "r+b") as handle:  # the header still opens; the later tiles are cut off
        handle.truncate(image.stat().st_size // 2)
    write_raster(tmp_path / "lbl" / "scene.tif", rng.integers(0, 2, size=(512, 512)).astype("uint8"))
    dataset = user_dataset_yaml(tmp_path / "my_dataset.yaml", ["r", "g", "b"], ["land", "water"])
    store = tmp_path / "store.zarr"
    argv = ["ingest", "--store", str(store), "--images", str(image), "--labels", str(tmp_path / "lbl"),
            "--dataset", str(dataset)]
    _one_line(capsys, argv, str(image), "corrupt")
    assert not (store / "scene").exists()


GOOD = "name: mine\nclasses: [land, water]\nbands: [r, g, b]\n"


@pytest.mark.parametrize("text, key", [
    (GOOD + "colour: 3\n", "colour"),  # unknown key
    (GOOD + "ignore_index: many\n", "ignore_index"),  # wrong type
    (GOOD.replace("[land, water]", "[land, water"), "invalid YAML at line 3"),  # syntax: where parsing stops
    ("name: mine\nbands: [r, g, b]\n", "classes"),  # missing classes
    (GOOD.replace("[land, water]", "[]"), "classes"),  # empty classes
    (GOOD + "palette: [[0, 0, 0]]\n", "palette"),  # one colour for two classes
])
def test_dataset_yaml_errors_name_the_file_and_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    dataset = tmp_path / "my_dataset.yaml"
    dataset.write_text(text)
    argv = ["ingest", "--store", str(tmp_path / "store.zarr"), "--images", str(tmp_path),
            "--labels", str(tmp_path), "--dataset", str(dataset)]
    _one_line(capsys, argv, f"{dataset}: {key}")
    assert not (tmp_path / "store.zarr").exists()
