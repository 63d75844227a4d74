"""`lrss-ds synth`: deterministic synthetic GeoTIFF scenes whose river/lake classes need long-range context.

Each scene is drawn from a small global description (``SceneLayout``: a river polyline crossing
the scene, compact lakes, straight roads, clusters of buildings, a brick grid of field parcels)
and rendered tile by tile from absolute pixel coordinates, so any window renders the same pixels
as the whole scene and memory stays bounded by one tile whatever the scene size.

River and lake pixels share one spectral signature and one texture function: a crop inside a
river is indistinguishable from a crop inside a lake. Only extent tells them apart (the river
crosses the whole scene; a lake is a blob of a few percent of it), as in EHSNet's Fig. 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrss_ds.data.catalog import get_dataset
from lrss_ds.errors import ConfigError, OutputExistsError
from lrss_ds.sizes import parse_size

BACKGROUND, FIELD, ROAD, BUILDING, RIVER, LAKE = range(6)
TILE = 512
DEFAULT_EPSG = 32633  # WGS 84 / UTM zone 33N
PIXEL_SIZE_M = 4.0  # FBP's ground sample distance

# Spectral signature per class in band order NIR, R, G, B (further bands cycle through these).
# RIVER and LAKE are one row on purpose: the same water.
_SIGNATURE = np.array(
    [
        [115, 150, 135, 112],  # background: bare soil, field margins
        [175, 70, 112, 62],  # field (tone varies per parcel)
        [95, 118, 118, 120],  # road
        [150, 175, 160, 150],  # building (tone varies per roof)
        [28, 44, 70, 96],  # river  (water)
        [28, 44, 70, 96],  # lake   (the same water)
    ],
    dtype=np.float32,
)


@dataclass
class SceneLayout:
    """Global description of one synthetic scene; all sizes are in pixels.

    Args:
        height, width: scene size.
        seed: seed of the per-pixel texture hash.
        river: (N, 2) polyline vertices (row, col) from one edge to the opposite one.
        river_half_width: river half width.
        lakes: per lake (row, col, radius, aspect, angle, wobble phases).
        roads: per road (row, col, angle, half_width): a straight line through the point.
        buildings: per building (row0, col0, row1, col1, tone).
        parcel_rows: y of the horizontal parcel boundaries.
        parcel_cols: per horizontal strip, x of its vertical parcel boundaries.
        parcel_seed: seed of the per-parcel crop tone and bare/field choice.
        boundary: half width of the field boundaries.
    """

    height: int
    width: int
    seed: int
    river: np.ndarray
    river_half_width: float
    lakes: list[tuple[float, ...]]
    roads: list[tuple[float, float, float, float]]
    buildings: np.ndarray
    parcel_rows: np.ndarray
    parcel_cols: list[np.ndarray]
    parcel_seed: int
    boundary: float
    extras: dict = field(default_factory=dict)


def _polyline_distance(points: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Distance of each (row, col) to a polyline ``(N, 2)``; inputs broadcast."""
    best = np.full(np.broadcast(rows, cols).shape, np.inf, np.float32)
    for (r0, c0), (r1, c1) in zip(points[:-1], points[1:]):
        dr, dc = r1 - r0, c1 - c0
        length2 = dr * dr + dc * dc
        t = np.clip(((rows - r0) * dr + (cols - c0) * dc) / length2, 0.0, 1.0)
        dist = np.hypot(rows - (r0 + t * dr), cols - (c0 + t * dc))
        np.minimum(best, dist, out=best)
    return best


def make_layout(seed: int, index: int, height: int, width: int, water_scale: float = 1.0) -> SceneLayout:
    """Draw the global description of scene ``index`` of a run with ``seed``.

    Args:
        seed: the run's seed.
        index: scene number; each scene has its own layout.
        height, width: scene size in pixels (any size; features scale with the scene).
        water_scale: factor on the river width and the lake radii (1: the default scenes,
            bit-identical to those drawn without it). Benchmarks raise it so that a lake and
            the river's width exceed a patch model's patch at a scene size that trains in
            minutes: then a patch inside either sees only water, and only context tells them
            apart. The river keeps its course; the lakes' placement takes another number of
            random draws, so lakes, roads, buildings and parcels differ from the default scene's.

    Returns:
        The layout; rendering it is deterministic.
    """
    if not 0.0 < water_scale <= 5.0:
        # past ~5.8 a lake's radius passes half the scene and its centre cannot be drawn
        raise ConfigError("water_scale", f"must be in (0, 5], got {water_scale}")
    rng = np.random.default_rng([seed, index, height, width])
    size = float(min(height, width))

    # River: enters on one edge, leaves on the opposite one, meandering.
    half_width = max(2.5, 0.028 * size * rng.uniform(0.85, 1.2) * water_scale)
    steps = 48
    t = np.linspace(0.0, 1.0, steps)
    wander = np.zeros(steps)
    for harmonic in range(1, 4):
        wander += rng.uniform(0.02, 0.07) / harmonic * np.sin(math.pi * harmonic * (t * rng.uniform(1.0, 2.2)) + rng.uniform(0, 2 * math.pi))
    start, end = rng.uniform(0.2, 0.8, 2)
    across = start + (end - start) * t + wander
    if rng.random() < 0.5:  # west -> east
        river = np.stack([across * height, t * (width + 2 * half_width) - half_width], 1)
    else:  # north -> south
        river = np.stack([t * (height + 2 * half_width) - half_width, across * width], 1)

    # Lakes: compact blobs well clear of the river, wider than it so their insides look alike.
    lakes: list[tuple[float, ...]] = []
    wanted = int(rng.integers(1, 4))
    for _ in range(200):
        if len(lakes) == wanted:
            break
        radius = max(half_width * 1.8, size * rng.uniform(0.05, 0.085) * water_scale)
        r, c = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
        clear_river = _polyline_distance(river, np.float32(r), np.float32(c)) > radius * 1.35 + half_width * 2
        clear_lakes = all(math.hypot(r - lr, c - lc) > (radius + lrad) * 1.3 for lr, lc, lrad, *_ in lakes)
        if clear_river and clear_lakes:
            lakes.append((r, c, radius, rng.uniform(0.65, 1.0), rng.uniform(0, math.pi),
                          rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)))

    roads = []
    for _ in range(int(rng.integers(2, 4))):
        roads.append((rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0, math.pi),
                      max(1.0, 0.006 * size)))

    # Buildings: clusters beside the roads.
    buildings = []
    for _ in range(int(rng.integers(3, 7))):
        rr, rc, angle, road_hw = roads[int(rng.integers(len(roads)))]
        along = rng.uniform(-size, size)
        cr, cc = rr + along * math.sin(angle), rc + along * math.cos(angle)
        for _ in range(int(rng.integers(6, 16))):
            side = rng.choice([-1.0, 1.0]) * (road_hw + rng.uniform(0.01, 0.05) * size)
            shift = rng.uniform(-0.07, 0.07) * size
            br = cr + shift * math.sin(angle) + side * math.cos(angle)
            bc = cc + shift * math.cos(angle) - side * math.sin(angle)
            bh, bw = rng.uniform(0.008, 0.022, 2) * size
            bh, bw = max(bh, 2.0), max(bw, 2.0)
            if 0 <= br < height and 0 <= bc < width:
                buildings.append((br - bh / 2, bc - bw / 2, br + bh / 2, bc + bw / 2, rng.uniform(-35, 45)))
    building_array = np.asarray(buildings, np.float32).reshape(-1, 5)

    cell = max(16.0, 0.09 * size)
    parcel_rows = np.cumsum(rng.uniform(0.6, 1.4, int(height / cell * 1.6) + 3) * cell) - rng.uniform(0, cell)
    parcel_cols = [
        np.cumsum(rng.uniform(0.6, 1.4, int(width / cell * 1.6) + 3) * cell) - rng.uniform(0, cell)
        for _ in range(len(parcel_rows) + 1)
    ]
    return SceneLayout(
        height=height,
        width=width,
        seed=int(rng.integers(0, 2**31 - 1)),
        river=river.astype(np.float64),
        river_half_width=float(half_width),
        lakes=lakes,
        roads=roads,
        buildings=building_array,
        parcel_rows=parcel_rows,
        parcel_cols=parcel_cols,
        parcel_seed=int(rng.integers(0, 2**31 - 1)),
        boundary=max(0.75, 0.0035 * size),
    )


def _hash(*keys: np.ndarray | int) -> np.ndarray:
    """Deterministic uint32 hash of integer arrays (broadcast), a cheap stateless RNG."""
    h = np.uint32(0x9E3779B9)
    for key in keys:
        k = np.asarray(key).astype(np.uint32)
        h = (h ^ k) * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        h = h ^ (h >> np.uint32(16))
    return h


def _unit(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


_TEXTURE_PERIOD = 512


def _textures(layout: SceneLayout) -> np.ndarray:
    """Return the scene's periodic texture tables ``(3, P, P)`` float32: medium, fine, grain.

    Textures repeat every P pixels: drawing them once per scene and indexing by absolute
    coordinates is far cheaper than hashing every pixel, and at P = 512 the repetition of a
    few-pixel texture is invisible. Cached on the layout.
    """
    if "textures" not in layout.extras:
        rng = np.random.default_rng([layout.seed, 1])
        period = _TEXTURE_PERIOD
        white = rng.standard_normal((2, period, period))
        freq = np.fft.fftfreq(period)
        f2 = freq[:, None] ** 2 + freq[None, :] ** 2
        tables = np.empty((3, period, period), np.float32)
        for i, sigma in enumerate((3.5, 1.0)):
            # Gaussian blur in the Fourier domain: periodic, so the table tiles seamlessly.
            smooth = np.fft.ifft2(np.fft.fft2(white[i]) * np.exp(-2 * (math.pi * sigma) ** 2 * f2)).real
            tables[i] = smooth / smooth.std()
        tables[2] = rng.random((period, period)) - 0.5
        layout.extras["textures"] = tables
    return layout.extras["textures"]


def _coarse_noise(layout: SceneLayout, rows: np.ndarray, cols: np.ndarray, spacing: float, key: int) -> np.ndarray:
    """Smooth noise in [-1, 1] with feature size ``spacing``, bilinear on a hashed lattice.

    Evaluated separably (rows, then columns), so a window costs O(h*w) with a small constant.
    """
    y, x = rows[:, 0] / spacing, cols[0] / spacing
    iy, ix = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = (y - iy).astype(np.float32), (x - ix).astype(np.float32)
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    lattice_cols = np.arange(ix.min(), ix.max() + 2)
    top = _unit(_hash(iy[:, None], lattice_cols[None, :], layout.seed, key))
    bottom = _unit(_hash(iy[:, None] + 1, lattice_cols[None, :], layout.seed, key))
    along_rows = top + (bottom - top) * fy[:, None]  # (h, n_lattice_cols)
    j = ix - lattice_cols[0]
    left, right = along_rows[:, j], along_rows[:, j + 1]
    return (left + (right - left) * fx[None, :]) * 2 - 1


def _box(r0: float, r1: float, c0: float, c1: float, window: tuple[int, int, int, int]) -> tuple[slice, slice] | None:
    """Return the window-relative slices of the box rows [r0, r1) x cols [c0, c1), or None if empty."""
    wr, wc, h, w = window
    a, b = max(int(math.floor(r0)) - wr, 0), min(int(math.ceil(r1)) - wr, h)
    c, d = max(int(math.floor(c0)) - wc, 0), min(int(math.ceil(c1)) - wc, w)
    if a >= b or c >= d:
        return None
    return slice(a, b), slice(c, d)


def render(layout: SceneLayout, window: tuple[int, int, int, int], bands: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Render a window of a scene.

    Args:
        layout: the scene's description.
        window: ``(row_off, col_off, height, width)``.
        bands: band count; bands cycle through NIR, R, G, B signatures.

    Returns:
        ``(image (bands, h, w) uint8, label (h, w) uint8)``; identical to the same crop of the
        whole scene rendered at once.
    """
    r0, c0, h, w = window
    rows = np.arange(r0, r0 + h, dtype=np.float32)[:, None]
    cols = np.arange(c0, c0 + w, dtype=np.float32)[None, :]
    label = np.zeros((h, w), np.uint8)
    tone = np.zeros((h, w), np.float32)  # per-object brightness offset

    # Field parcels in a brick grid: strips of rows, each with its own column boundaries.
    # Hashes are taken per parcel (a few hundred), not per pixel.
    strip = np.searchsorted(layout.parcel_rows, rows[:, 0])
    upper = layout.parcel_rows[np.clip(strip - 1, 0, None)]
    lower = layout.parcel_rows[np.clip(strip, None, len(layout.parcel_rows) - 1)]
    row_edge = (np.abs(rows[:, 0] - upper) < layout.boundary) | (np.abs(rows[:, 0] - lower) < layout.boundary)
    for s in np.unique(strip):
        sel = np.flatnonzero(strip == s)
        edges = layout.parcel_cols[int(s)]
        col_idx = np.searchsorted(edges, cols[0])
        col_edge = np.minimum(np.abs(cols[0] - edges[np.clip(col_idx - 1, 0, None)]),
                              np.abs(cols[0] - edges[np.clip(col_idx, None, len(edges) - 1)])) < layout.boundary
        parcel_hash = _hash(col_idx, int(s), layout.parcel_seed)
        is_field = _unit(parcel_hash) < 0.72
        parcel_tone = (_unit(_hash(parcel_hash, 7)) - 0.5) * 60 * is_field
        field_here = is_field[None, :] & ~col_edge[None, :] & ~row_edge[sel, None]
        label[sel] = np.where(field_here, FIELD, BACKGROUND)
        tone[sel] = parcel_tone[None, :]

    # Buildings (only those overlapping the window).
    for br0, bc0, br1, bc1, btone in layout.buildings:
        box = _box(round(br0), round(br1), round(bc0), round(bc1), window)
        if box is not None:
            label[box] = BUILDING
            tone[box] = btone

    for rr, rc, angle, half in layout.roads:
        centre = abs((r0 + h / 2 - rr) * math.cos(angle) - (c0 + w / 2 - rc) * math.sin(angle))
        if centre > half + math.hypot(h, w) / 2:
            continue  # the road misses this window
        dist = np.abs((rows - rr) * math.cos(angle) - (cols - rc) * math.sin(angle))
        on_road = dist < half
        label[on_road] = ROAD
        tone[on_road] = 0

    # Water: lakes, then the river; one texture for both, applied below by class. Each shape
    # is evaluated only inside its bounding box.
    for lr, lc, radius, aspect, angle, ph1, ph2 in layout.lakes:
        reach = radius * 1.2
        box = _box(lr - reach, lr + reach, lc - reach, lc + reach, window)
        if box is None:
            continue
        dy, dx = rows[box[0]] - lr, cols[:, box[1]] - lc
        u = dy * math.cos(angle) + dx * math.sin(angle)
        v = (-dy * math.sin(angle) + dx * math.cos(angle)) / aspect
        theta = np.arctan2(v, u)
        edge = radius * (1 + 0.12 * np.sin(3 * theta + ph1) + 0.07 * np.sin(5 * theta + ph2))
        label[box][np.hypot(u, v) < edge] = LAKE
    half = layout.river_half_width
    reach = half * 1.25
    dist = None
    pts = layout.river
    for (pr0, pc0), (pr1, pc1) in zip(pts[:-1], pts[1:]):
        box = _box(min(pr0, pr1) - reach, max(pr0, pr1) + reach, min(pc0, pc1) - reach, max(pc0, pc1) + reach, window)
        if box is None:
            continue
        if dist is None:
            dist = np.full((h, w), np.inf, np.float32)
        seg = _polyline_distance(np.array([[pr0, pc0], [pr1, pc1]]), rows[box[0]], cols[:, box[1]])
        np.minimum(dist[box], seg, out=dist[box])
    if dist is not None:
        width_mod = 1 + 0.18 * _coarse_noise(layout, rows, cols, 6 * half, 11)
        label[dist < half * width_mod] = RIVER

    # Image: class signature + per-object tone + textures; water gets the water texture only.
    tables = _textures(layout)
    ri = np.arange(r0, r0 + h) % _TEXTURE_PERIOD
    ci = np.arange(c0, c0 + w) % _TEXTURE_PERIOD
    medium, fine, grain = (t[ri][:, ci] for t in tables)
    light = _coarse_noise(layout, rows, cols, 0.35 * min(layout.height, layout.width) + 8, 3)
    water = (label == RIVER) | (label == LAKE)
    texture = np.where(water, 5 * medium + 3 * fine, 14 * medium + 7 * fine + tone)
    texture += 10 * light + 8 * grain
    image = np.empty((bands, h, w), np.uint8)
    for band in range(bands):
        sig = _SIGNATURE[:, band % 4]
        value = sig[label] + texture * (1.0 if band % 4 else 1.3)
        np.clip(value, 0, 255, out=value)
        image[band] = value.astype(np.uint8)
    return image, label


def render_scene(layout: SceneLayout, bands: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Render a whole scene into memory (small scenes; the CLI writes tile by tile instead)."""
    return render(layout, (0, 0, layout.height, layout.width), bands)


def scene_transform(index: int, height: int, width: int) -> tuple[float, ...]:
    """Return the affine transform (a, b, c, d, e, f) of scene ``index``: 4 m pixels in UTM 33N."""
    x0 = 400_000.0 + index * (width * PIXEL_SIZE_M + 1000.0)
    y0 = 5_300_000.0
    return (PIXEL_SIZE_M, 0.0, x0, 0.0, -PIXEL_SIZE_M, y0)


def write_scene(
    image_path: Path, label_path: Path, layout: SceneLayout, index: int, bands: int, compress: str = "deflate"
) -> None:
    """Write a scene's image and label GeoTIFFs tile by tile (memory: one tile).

    Each file is written under a temporary name and renamed when complete.
    """
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.windows import Window

    spec = get_dataset("synthetic")
    height, width = layout.height, layout.width
    common = dict(
        driver="GTiff", height=height, width=width, crs=CRS.from_epsg(DEFAULT_EPSG),
        transform=Affine(*scene_transform(index, height, width)[:6]),
        tiled=True, blockxsize=TILE, blockysize=TILE,
    )
    if compress != "none":
        # Level 1 + horizontal differencing: within 10 % of the default level's size at a
        # tenth of its time, which keeps a 6800x7200 scene at seconds.
        common.update(compress=compress, predictor=2)
        if compress == "deflate":
            common["zlevel"] = 1
        elif compress == "zstd":
            common["zstd_level"] = 1
    tmp_image = image_path.with_name(image_path.name + ".partial")
    tmp_label = label_path.with_name(label_path.name + ".partial")
    band_names = (spec.bands * ((bands + 3) // 4))[:bands]
    with rasterio.open(tmp_image, "w", count=bands, dtype="uint8", interleave="pixel" if bands <= 4 else "band", **common) as dst_img, \
            rasterio.open(tmp_label, "w", count=1, dtype="uint8", **common) as dst_lbl:
        dst_img.descriptions = tuple(band_names)
        dst_lbl.write_colormap(1, {i: tuple(c) + (255,) for i, c in enumerate(spec.palette or [])})
        for r0 in range(0, height, TILE):
            for c0 in range(0, width, TILE):
                h, w = min(TILE, height - r0), min(TILE, width - c0)
                image, label = render(layout, (r0, c0, h, w), bands)
                dst_img.write(image, window=Window(c0, r0, w, h))
                dst_lbl.write(label, 1, window=Window(c0, r0, w, h))
    tmp_image.replace(image_path)
    tmp_label.replace(label_path)


MANIFEST = "synth.json"


def scene_ids(seed: int, scenes: int) -> list[str]:
    """Return the ids of the ``scenes`` scenes of ``seed``: ``synth_<seed>_<index:04d>``."""
    return [f"synth_{seed:d}_{i:04d}" for i in range(scenes)]


def manifest(scenes: int, size: tuple[int, int], bands: int, seed: int, compress: str = "deflate",
             water_scale: float = 1.0) -> dict:
    """Return the parameters ``synthesize`` records in ``synth.json`` for these arguments."""
    return {"scenes": scenes, "height": size[0], "width": size[1], "bands": bands, "seed": seed, "compress": compress,
            "water_scale": float(water_scale)}


def made_water_scale(recorded: dict) -> float:
    """The ``water_scale`` a recorded ``synth.json`` was made with (records without one: 1.0)."""
    return float(recorded.get("water_scale", 1.0))


def read_manifest(out: Path) -> dict | None:
    """Return the parameters recorded in ``out/synth.json`` by ``synthesize``, or None."""
    try:
        values = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def synthesize(out: Path, scenes: int, size: tuple[int, int], bands: int = 4, seed: int = 0,
               overwrite: bool = False, compress: str = "deflate", log=print, water_scale: float = 1.0) -> list[str]:
    """Write ``scenes`` synthetic scenes to ``out/images/<id>.tif`` and ``out/labels/<id>.tif``.

    The arguments are recorded in ``out/synth.json`` once every file is written.

    Args:
        out: output directory.
        scenes: number of scenes.
        size: ``(height, width)``.
        bands: image band count.
        seed: run seed; the same arguments give byte-identical files.
        overwrite: replace existing scene files instead of refusing.
        compress: GeoTIFF compression (``deflate``, ``zstd``, ``lzw`` or ``none``).
        log: where progress lines go.
        water_scale: ``make_layout``'s factor on river width and lake radii.

    Returns:
        The scene ids written.

    Raises:
        OutputExistsError: a scene file exists and ``overwrite`` is False.
        ConfigError: bad counts.
    """
    if scenes < 1:
        raise ConfigError("--scenes", "must be at least 1")
    if bands < 1:
        raise ConfigError("--bands", "must be at least 1")
    images, labels = out / "images", out / "labels"
    ids = scene_ids(seed, scenes)
    if not overwrite:
        for scene in ids:
            for path in (images / f"{scene}.tif", labels / f"{scene}.tif"):
                if path.exists():
                    raise OutputExistsError(path, "exists; pass --overwrite to replace it")
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    height, width = size
    for index, scene in enumerate(ids):
        start = time.perf_counter()
        layout = make_layout(seed, index, height, width, water_scale)
        write_scene(images / f"{scene}.tif", labels / f"{scene}.tif", layout, index, bands, compress)
        log(f"synth: {scene} {bands}x{height}x{width} in {time.perf_counter() - start:.2f} s")
    partial = out / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest(scenes, size, bands, seed, compress, water_scale)))
    partial.replace(out / MANIFEST)
    return ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``lrss-ds synth`` options."""
    parser.add_argument("--out", required=True, type=Path, help="output directory (gets images/ and labels/)")
    parser.add_argument("--scenes", type=int, default=4, help="number of scenes (default 4)")
    parser.add_argument("--size", default="512x512", help="scene size HxW (default 512x512)")
    parser.add_argument("--bands", type=int, default=4, help="image bands (default 4: NIR,R,G,B)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--compress", default="deflate", choices=["deflate", "zstd", "lzw", "none"],
                        help="GeoTIFF compression (default deflate)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing scene files")


def run(args: argparse.Namespace) -> int:
    """Run ``lrss-ds synth``."""
    synthesize(args.out, args.scenes, parse_size(args.size, minimum=16), args.bands, args.seed,
               overwrite=args.overwrite, compress=args.compress,
               log=lambda line: print(line, file=sys.stderr))
    return 0
