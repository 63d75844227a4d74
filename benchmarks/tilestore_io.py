"""Benchmark: one scene as GeoTIFF (uncompressed, zstd) and as the Zarr tile store, read whole and by window.

Usage:
    python benchmarks/tilestore_io.py [--size 6800x7200] [--bands 4] [--windows 200] [--repeats 5]
                                      [--workdir DIR] [--out benchmarks/results/tilestore_io]

Measures, for each format: full-scene read time (median of ``--repeats`` after one warm-up),
random 512x512 window reads per second (the same unaligned windows for every format) and bytes
on disk; plus the ingest time and peak RSS of ``lrss-ds ingest`` for the scene. Files are read
warm (in the page cache): the test machine is shared, so dropping caches is not an option. GDAL's
block cache is capped at 64 MiB and datasets are reopened for each full read, so GeoTIFF
numbers are not flattered by re-reading already decoded blocks (Zarr keeps no such cache).
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _harness import benchmark_parser, machine_header, parse_benchmark_args, write_json_and_markdown  # noqa: E402

GDAL_CACHE_MB = 64
WINDOW = 512


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _write_geotiff(source: Path, target: Path, **options) -> None:
    """Copy ``source`` into a tiled GeoTIFF with ``options``, by row blocks (bounded memory)."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(source) as src:
        profile = src.profile.copy()
        for key in ("compress", "predictor", "interleave", "tiled", "blockxsize", "blockysize"):
            profile.pop(key, None)
        profile.update(tiled=True, blockxsize=WINDOW, blockysize=WINDOW, **options)
        with rasterio.open(target, "w", **profile) as dst:
            for row in range(0, src.height, WINDOW):
                window = Window(0, row, src.width, min(WINDOW, src.height - row))
                dst.write(src.read(window=window), window=window)


def _write_zarr(source: Path, target: Path, chunks: tuple[int, int, int], compressors) -> None:
    """Write the scene as a bare Zarr v3 array (for alternatives to the store's choice)."""
    import rasterio
    import zarr
    from rasterio.windows import Window

    with rasterio.open(source) as src:
        array = zarr.create_array(str(target), shape=(src.count, src.height, src.width), chunks=chunks,
                                  dtype=src.dtypes[0], compressors=compressors, fill_value=0)
        for row in range(0, src.height, WINDOW):
            window = Window(0, row, src.width, min(WINDOW, src.height - row))
            array[:, row:row + window.height, :] = src.read(window=window)


LANDSAT = ROOT.parent / "shared" / "realdata" / "rasterio_rgb_byte" / "RGB.byte.tif"


def _write_mirrored_landsat(image_path: Path, label_path: Path, height: int, width: int) -> None:
    """Write a scene of real pixels: the Landsat test image mirrored (reflected) up to the size."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(LANDSAT) as src:
        pixels = src.read()
        profile = dict(driver="GTiff", height=height, width=width, dtype="uint8", crs=src.crs,
                       transform=src.transform, tiled=True, blockxsize=WINDOW, blockysize=WINDOW,
                       compress="deflate", zlevel=1, predictor=2)

    def reflect(index: np.ndarray, n: int) -> np.ndarray:
        index = index % (2 * n)
        return np.where(index < n, index, 2 * n - 1 - index)

    cols = reflect(np.arange(width), pixels.shape[2])
    with rasterio.open(image_path, "w", count=3, **profile) as img, \
            rasterio.open(label_path, "w", count=1, **profile) as lbl:
        for row in range(0, height, WINDOW):
            rows = reflect(np.arange(row, min(row + WINDOW, height)), pixels.shape[1])
            block = pixels[:, rows][:, :, cols]
            window = Window(0, row, width, len(rows))
            img.write(block, window=window)
            lbl.write(((block[0].astype(np.int32) // 64) % 3).astype(np.uint8), 1, window=window)


def _windows(height: int, width: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, height - WINDOW + 1)), int(rng.integers(0, width - WINDOW + 1))) for _ in range(count)]


def _geotiff_readers(path: Path, threads: str | None) -> tuple:
    """Return (read_full, read_window) for a GeoTIFF under a capped GDAL block cache."""
    import rasterio
    from rasterio.windows import Window

    env = {"GDAL_CACHEMAX": GDAL_CACHE_MB}
    if threads:
        env["GDAL_NUM_THREADS"] = threads

    def read_full() -> np.ndarray:
        with rasterio.Env(**env), rasterio.open(path) as src:
            return src.read()

    with rasterio.Env(**env):
        src = rasterio.open(path)  # kept open for the window reads, as a reader would

    def read_window(row: int, col: int) -> np.ndarray:
        with rasterio.Env(**env):
            return src.read(window=Window(col, row, WINDOW, WINDOW))

    return read_full, read_window


INGEST_RSS_SCRIPT = """
import resource, sys, time
import numpy, zarr, rasterio
from lrss_ds.data.ingest import ingest
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
ingest(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], log=lambda s: None)
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base * 1024, peak * 1024, elapsed)
"""


def _machine() -> dict:
    """The shared machine header, plus the storage libraries' versions and the keys this report shows."""
    import numcodecs
    import rasterio
    import zarr

    header = machine_header("", extra={
        "logical_cpus": os.cpu_count(), "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
        "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    })
    # the node's accelerator (in the header) is for comparing reports; this benchmark reads on the host only
    header["memory"] = f"{header['ram_gib']:.1f} GiB"
    return header


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON and Markdown results."""
    parser = benchmark_parser(__doc__.splitlines()[0], out=ROOT / "benchmarks" / "results" / "tilestore_io",
                              conditions=False, out_help="results path without suffix (writes <out>.json and <out>.md)")
    parser.add_argument("--size", default="6800x7200")
    parser.add_argument("--bands", type=int, default=4)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--scene", choices=["synthetic", "landsat"], default="synthetic",
                        help="synthetic (lrss-ds synth) or real Landsat pixels mirrored to --size "
                             "(needs ../shared/realdata)")
    parser.add_argument("--rerender", type=Path, default=None,
                        help="only rewrite <out>.md (and the targets) from an existing results JSON")
    args = parse_benchmark_args(parser, argv)
    if args.rerender:
        result = json.loads(args.rerender.read_text())
        result["targets"] = _targets(result["rows"])
        write_json_and_markdown(args.rerender, result, _markdown(result))
        return 0

    import zarr
    from zarr.codecs import BloscCodec

    from lrss_ds.data.chunk_reader import ChunkReader
    from lrss_ds.data.store import TileStore
    from lrss_ds.data.synth import make_layout, write_scene
    from lrss_ds.sizes import parse_size

    height, width = parse_size(args.size)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tilestore_io_"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    try:
        (work / "images").mkdir(exist_ok=True)
        (work / "labels").mkdir(exist_ok=True)
        start = time.perf_counter()
        base = work / "images" / "scene.tif"
        dataset = "synthetic"
        if args.scene == "synthetic":
            write_scene(base, work / "labels" / "scene.tif", make_layout(0, 0, height, width), 0, args.bands,
                        compress="deflate")
            content = "lrss-ds synth scene (seed 0)"
        else:
            args.bands = 3
            dataset = str(work / "landsat.yaml")
            Path(dataset).write_text("name: landsat\nclasses: [dark, mid, bright]\nignore_index: 255\n"
                                     "label_encoding: index\nbands: [R, G, B]\n")
            _write_mirrored_landsat(base, work / "labels" / "scene.tif", height, width)
            content = "real Landsat pixels: rasterio's RGB.byte.tif mirrored to size (nodata borders included)"
        synth_seconds = time.perf_counter() - start

        # Ingest (the store's own writer) in a subprocess, for its peak RSS.
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", INGEST_RSS_SCRIPT, str(work / "store.zarr"),
                              str(work / "images"), str(work / "labels"), dataset],
                             env=env, capture_output=True, text=True, check=True).stdout.split()
        rss_base, rss_peak, ingest_seconds = int(out[0]), int(out[1]), float(out[2])

        variants: dict[str, Path] = {}
        variants["GeoTIFF uncompressed, tiled, band-interleaved"] = work / "plain_band.tif"
        _write_geotiff(base, variants["GeoTIFF uncompressed, tiled, band-interleaved"], interleave="band")
        variants["GeoTIFF uncompressed, tiled, pixel-interleaved"] = work / "plain_pixel.tif"
        _write_geotiff(base, variants["GeoTIFF uncompressed, tiled, pixel-interleaved"], interleave="pixel")
        variants["GeoTIFF zstd (GDAL default level), tiled"] = work / "zstd.tif"
        _write_geotiff(base, variants["GeoTIFF zstd (GDAL default level), tiled"], compress="zstd")
        variants["GeoTIFF zstd + predictor 2, tiled"] = work / "zstd_p2.tif"
        _write_geotiff(base, variants["GeoTIFF zstd + predictor 2, tiled"], compress="zstd", predictor=2)

        zarr_alternatives = {
            "Zarr blosc-zstd clevel 3, (bands,512,512)": ((args.bands, WINDOW, WINDOW), BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")),
            "Zarr blosc-lz4 + bitshuffle, (bands,512,512)": ((args.bands, WINDOW, WINDOW), BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")),
            "Zarr uncompressed, (bands,512,512)": ((args.bands, WINDOW, WINDOW), None),
            "Zarr blosc-lz4, per-band (1,512,512)": ((1, WINDOW, WINDOW), BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")),
        }
        for name, (chunks, codec) in zarr_alternatives.items():
            path = work / ("alt_" + str(abs(hash(name))))
            _write_zarr(base, path, chunks, codec)
            variants[name] = path

        windows = _windows(height, width, args.windows)
        store = TileStore.open(work / "store.zarr")
        scene = store.scenes()[0]
        box = (slice(0, args.bands), slice(0, height), slice(0, width))
        readers: dict[str, tuple] = {}  # name -> (read_full, read_window(row, col), bytes on disk)
        store_bytes = _dir_bytes(work / "store.zarr" / scene / "image")
        readers["TileStore.read (blosc-lz4, (bands,512,512)) - chosen"] = (
            lambda: TileStore.open(work / "store.zarr").read_image(scene),
            lambda r, c: store.read_image(scene, (r, c, WINDOW, WINDOW)), store_bytes)
        plain = zarr.open_array(str(work / "store.zarr" / scene / "image"), mode="r")
        readers["same store read through zarr-python (plain zarr API)"] = (
            lambda: zarr.open_array(str(work / "store.zarr" / scene / "image"), mode="r")[:],
            lambda r, c: plain[:, r:r + WINDOW, c:c + WINDOW], store_bytes)
        for name, path in variants.items():
            if path.suffix == ".tif":
                readers[name] = _geotiff_readers(path, None) + (_dir_bytes(path),)
            else:
                reader = ChunkReader.for_array(path)
                readers[name] = (
                    lambda p=path: ChunkReader.for_array(p).read(box),
                    lambda r, c, rd=reader: rd.read((slice(0, args.bands), slice(r, r + WINDOW), slice(c, c + WINDOW))),
                    _dir_bytes(path))
        zstd_path = variants["GeoTIFF zstd (GDAL default level), tiled"]
        readers["GeoTIFF zstd, GDAL_NUM_THREADS=ALL_CPUS"] = _geotiff_readers(zstd_path, "ALL_CPUS") + (_dir_bytes(zstd_path),)

        # Correctness first: every format holds the same pixels.
        reference = None
        for name, (read_full, read_window, _) in readers.items():
            full = read_full()
            if reference is None:
                reference = full
            assert np.array_equal(full, reference), f"{name} read different pixels"
            r, c = windows[0]
            assert np.array_equal(read_window(r, c), reference[:, r:r + WINDOW, c:c + WINDOW]), name
            del full
        del reference

        # Round robin over formats, so load changes from other jobs hit all of them alike.
        full_times: dict[str, list[float]] = {name: [] for name in readers}
        window_times: dict[str, list[float]] = {name: [] for name in readers}
        batch = max(1, len(windows) // args.repeats)
        for rep in range(args.repeats):
            for name, (read_full, read_window, _) in readers.items():
                start = time.perf_counter()
                read_full()
                full_times[name].append(time.perf_counter() - start)
                part = windows[rep * batch:(rep + 1) * batch] or windows[:batch]
                start = time.perf_counter()
                for r, c in part:
                    read_window(r, c)
                window_times[name].append((time.perf_counter() - start) / len(part))
        rows = []
        for name, (_, _, size) in readers.items():
            row = {"format": name,
                   "full_read_s": statistics.median(full_times[name]), "full_read_min_s": min(full_times[name]),
                   "windows_per_s": 1.0 / statistics.median(window_times[name]),
                   "windows_per_s_best": 1.0 / min(window_times[name]), "bytes_on_disk": size}
            rows.append(row)
            print(f"{name:55s} full {row['full_read_s']:6.3f} s (min {row['full_read_min_s']:.3f})  "
                  f"windows {row['windows_per_s']:7.1f}/s  {size / 2**20:8.1f} MiB", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    result = {
        "scene": {"bands": args.bands, "height": height, "width": width, "dtype": "uint8",
                  "content": content, "bytes_raw": args.bands * height * width},
        "conditions": {
            "cache": "warm page cache; GDAL_CACHEMAX 64 MiB; GeoTIFF reopened per full read",
            "repeats": args.repeats, "order": "round robin over formats, full read then a batch of windows", "windows": args.windows, "window": WINDOW,
            "load_average_before": load_before, "load_average_after": load_after,
            "note": "machine shared with ~7 other jobs on 2 cores; numbers vary with their load",
        },
        "machine": _machine(),
        "ingest": {"seconds": ingest_seconds, "peak_rss_bytes": rss_peak, "rss_after_imports_bytes": rss_base,
                   "peak_above_interpreter_bytes": rss_peak - rss_base, "source": "deflate GeoTIFF (lrss-ds synth)"},
        "synth_seconds": synth_seconds,
        "rows": rows,
        "targets": _targets(rows),
    }
    write_json_and_markdown(args.out.with_suffix(".json"), result, _markdown(result))
    print(json.dumps(result["targets"], indent=2))
    return 0


def _targets(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Return the target ratios from the measured rows, from medians and from best rounds."""
    by_name = {r["format"]: r for r in rows}
    ours = rows[0]

    def ratios(full_key: str, window_key: str) -> dict[str, float]:
        plain = [by_name[k] for k in by_name if k.startswith("GeoTIFF uncompressed")]
        floor_full = min(r[full_key] for r in plain)
        floor_windows = max(r[window_key] for r in plain)
        zstd = by_name["GeoTIFF zstd (GDAL default level), tiled"]
        return {
            "full_read_vs_uncompressed_floor": ours[full_key] / floor_full,
            "windows_vs_uncompressed_floor": floor_windows / ours[window_key],
            "full_read_speedup_vs_zstd": zstd[full_key] / ours[full_key],
            "windows_speedup_vs_zstd": ours[window_key] / zstd[window_key],
        }

    # Medians include the other jobs' load; the best round is closest to the formats' own cost.
    return {"median": ratios("full_read_s", "windows_per_s"), "best": ratios("full_read_min_s", "windows_per_s_best")}


def _markdown(result: dict) -> str:
    scene, cond, machine, ingest = result["scene"], result["conditions"], result["machine"], result["ingest"]
    t = result["targets"]
    lines = [
        "# Tile store I/O benchmark (`benchmarks/tilestore_io.py`)",
        "",
        f"Scene: {scene['bands']}x{scene['height']}x{scene['width']} {scene['dtype']} ({scene['content']}, "
        f"{scene['bytes_raw'] / 2**20:.0f} MiB raw). Random windows: {cond['windows']} unaligned "
        f"{cond['window']}x{cond['window']}, same for every format. Full read: median (and min) of {cond['repeats']} rounds, formats read round robin after a correctness pass.",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['memory']}; Python "
        f"{machine['python']}, numpy {machine['numpy']}, zarr {machine['zarr']}, numcodecs {machine['numcodecs']}, "
        f"rasterio {machine['rasterio']}, GDAL {machine['gdal']}; {machine['date_utc']} UTC.",
        f"Conditions: {cond['cache']}. Load average before {tuple(round(x, 1) for x in cond['load_average_before'])}, "
        f"after {tuple(round(x, 1) for x in cond['load_average_after'])} ({cond['note']}).",
        "",
        "| format | full-scene read, median (s) | min (s) | 512x512 windows/s, median | best | on disk (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['format']} | {row['full_read_s']:.3f} | {row['full_read_min_s']:.3f} | "
                     f"{row['windows_per_s']:.0f} | {row['windows_per_s_best']:.0f} | {row['bytes_on_disk'] / 2**20:.1f} |")
    lines += [
        "",
        "Targets (tile store = first row, read with `TileStore.read`; Zarr alternatives are read the same way; "
        "floor = fastest uncompressed GeoTIFF; zstd = GDAL default level, single-threaded):",
        "",
        "| ratio | from medians | from best rounds | target |",
        "|---|---:|---:|---|",
        f"| full read, store / uncompressed floor | {t['median']['full_read_vs_uncompressed_floor']:.2f}x | "
        f"{t['best']['full_read_vs_uncompressed_floor']:.2f}x | <= 1.3x |",
        f"| window rate, floor / store | {t['median']['windows_vs_uncompressed_floor']:.2f}x | "
        f"{t['best']['windows_vs_uncompressed_floor']:.2f}x | <= 1.3x |",
        f"| full read speed-up vs zstd GeoTIFF | {t['median']['full_read_speedup_vs_zstd']:.2f}x | "
        f"{t['best']['full_read_speedup_vs_zstd']:.2f}x | >= 3x |",
        f"| window speed-up vs zstd GeoTIFF | {t['median']['windows_speedup_vs_zstd']:.2f}x | "
        f"{t['best']['windows_speedup_vs_zstd']:.2f}x | >= 3x |",
        "",
        f"Ingest of the scene from its deflate GeoTIFF: {ingest['seconds']:.1f} s, peak RSS "
        f"{ingest['peak_rss_bytes'] / 2**20:.0f} MiB, {ingest['peak_above_interpreter_bytes'] / 2**20:.0f} MiB above "
        f"the interpreter with numpy/zarr/rasterio imported (target < 1024 MiB). "
        f"Writing the source GeoTIFF pair took {result['synth_seconds']:.1f} s.",
        "",
        f"blosc-lz4 keeps this scene at {result['rows'][0]['bytes_on_disk'] / scene['bytes_raw']:.0%} of its raw size; "
        "where it compresses, every read pays lz4 decoding, which an uncompressed store (`lrss-ds ingest "
        "--codec none`, the 'Zarr uncompressed' row) does not.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
