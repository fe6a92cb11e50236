"""
Scenes in and out as GIS users have them (issue 23): masks, Cloud-Optimized
GeoTIFFs, Sentinel-1 products as delivered and an archive in one run.

    python benchmarks/bench_gis.py            # about 1 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/bench_gis.py --quick --results ''   # a smoke run

Part "masks" (item 1) generates a 150 x 100 SEN12MS-like scene (guided_diffusion.
demo.sen12ms.make_scene, VV and VH in dB), sets its first 12 columns to NaN (no SAR
data) and translates it with the bundled model (assets/scene_model) through
scripts/translate_scene.py (its default output, a COG), with the script's usual
sampler, DPM-Solver++(2M) in 20 steps. The result's 8-bit pixels are then read two
ways: as the file is written now (GDAL's internal dataset mask), and as the old
output declared them: the same pixels copied into a GeoTIFF with nodata 0 on every
band. For each, through rasterio, the pixels with SAR data that read as nodata
(read_masks: in any band; dataset_mask: in all bands) and the pixels without SAR
data that read as valid; over every pixel and over the water pixels alone (the
generator's class map: water has the lowest backscatter and the darkest colour).

Part "cog" (item 3) writes a square 8-bit RGB result (smooth colours and noise, its
left quarter without data) through io/geotiff.GeoTiffWriter a band of 256 rows at a
time, plain (cog=False) and Cloud-Optimized (cog=True), both with mask=True: seconds,
file size, the writer's bytes_needed against the peak bytes the output folder held
while writing (polled every 5 ms: the intermediate, the COG and GDAL's temporary
overviews together), rio_cogeo's cog_validate, the overview count, the byte offset
of the smallest overview's first tile, and the seconds to open the file and read a
256 x 256 window of that overview (the mean of 20 reads), which is what a web map
reading lazily does.

Part "sentinel1" (item 4) builds a GRD product of uint16 digital numbers, VV and VH
(annotation with a geolocation grid, a calibration table with a vector every 200
lines and a node every 40 pixels, about as dense as real tables), and times
io/sentinel1.write_sigma0 from its .SAFE folder and from its zip: seconds,
megapixels per second (one polarisation's pixels), and the peak of the memory
Python allocated (tracemalloc: numpy's arrays included, GDAL's block cache not) at
the full height and at a quarter of it: equal peaks show that the band of rows
keeps memory flat.

Part "archive" (item 5) writes 4 scenes of 64 x 64 into a folder and translates
them with scripts/translate_scene.py --input FOLDER --output FOLDER on 1 process
(the sampler and steps of part masks), then runs the same command again (every
scene skipped).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
import zipfile

import common
import numpy as np

REPO = os.path.dirname(common.BENCH_DIR)
TRANSLATE = os.path.join(REPO, "scripts", "translate_scene.py")
MODEL = os.path.join(REPO, "assets", "scene_model", "model.pt")
PARTS = ("masks", "cog", "sentinel1", "archive")


def translate(args, *flags):
    """Run translate_scene.py with the bundled model; return its wall seconds."""
    command = [sys.executable, TRANSLATE, "--model_path", MODEL, "--sampler", args.sampler,
               "--timestep_respacing", args.respacing, *flags]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit code {proc.returncode}")
    return seconds


# -- masks -----------------------------------------------------------------------------


def counts(path, sar_valid, where):
    """
    Pixels of ``where`` misread through rasterio's masks.

    :return: (with SAR data read as nodata in any band (read_masks), the same in
        every band (dataset_mask), without SAR data read as valid (dataset_mask)).
    """
    import rasterio

    with rasterio.open(path) as src:
        any_band = (src.read_masks() == 0).any(axis=0)
        dataset = src.dataset_mask() == 0
    return (
        int((any_band & sar_valid & where).sum()),
        int((dataset & sar_valid & where).sum()),
        int((~dataset & ~sar_valid & where).sum()),
    )


def part_masks(args, work):
    import rasterio

    from guided_diffusion.demo.sen12ms import make_scene

    height, width, strip = 100, 150, 12
    paths = make_scene(work, height=height, width=width, seed=args.scene_seed)
    with rasterio.open(paths["sar"], "r+") as src:
        sar = src.read()
        sar[:, :, :strip] = np.nan
        src.write(sar)
    sar_valid = ~np.isnan(sar).any(axis=0)
    from PIL import Image

    water = np.asarray(Image.open(paths["cls"])) == 0
    now = os.path.join(work, "now.tif")
    seconds = translate(args, "--input", paths["sar"], "--output", now)
    old = os.path.join(work, "old_nodata0.tif")
    with rasterio.open(now) as src:
        pixels, profile = src.read(), src.profile
    profile.update(nodata=0)
    with rasterio.open(old, "w", **profile) as dst:
        dst.write(pixels)
    zero_any = (pixels == 0).any(axis=0)
    rows = []
    for label, where in (("all pixels", np.ones_like(water)), ("water pixels", water)):
        for name, path in (("nodata=0 (old)", old), ("internal mask (now)", now)):
            lost_any, lost_all, gained = counts(path, sar_valid, where)
            darkest = pixels[:, sar_valid & where].min(axis=1)
            rows.append((label, name, int((sar_valid & where).sum()),
                         "/".join(map(str, darkest)),
                         int((zero_any & sar_valid & where).sum()), lost_any, lost_all,
                         int((~sar_valid & where).sum()), gained))  # fmt: skip
    header = ("pixels", "output", "with SAR data", "darkest R/G/B", "a band is 0", "read nodata (any band)",
              "read nodata (all bands)", "without SAR data", "read valid")  # fmt: skip
    notes = [
        f"{width} x {height} scene (make_scene seed {args.scene_seed}), its first "
        f"{strip} columns NaN; bundled model, {args.sampler} {args.respacing} steps, "
        f"{seconds:.1f} s for the translation.",
        "old: the result's pixels in a GeoTIFF declaring nodata 0 per band, as "
        "outputs were before issue 23; now: the file translate_scene.py writes "
        "(its default, a COG with an internal mask).",
        "'read nodata (any band)' counts read_masks() == 0 in some band, '(all "
        "bands)' dataset_mask() == 0; darkest: the least value of each band over "
        "the pixels with SAR data; water: the generator's class 0.",
    ]
    return "Issue 23 masks: pixels misread as holes (old nodata 0 vs internal mask)", \
        common.markdown_table(header, rows), notes  # fmt: skip


# -- cog -------------------------------------------------------------------------------


class FolderPeak:
    """The largest total size of a folder's files, polled in a thread."""

    def __init__(self, folder, every=0.005):
        self.folder, self.every, self.peak = folder, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _size(self):
        total = 0
        for name in os.listdir(self.folder):
            try:
                total += os.path.getsize(os.path.join(self.folder, name))
            except OSError:
                pass  # removed or renamed between listing and stat
        return total

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._size())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._size())
        return False


def rgb_result(size, seed=0):
    """(3, size, size) uint8: smooth colours with noise; the left quarter no data."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(4 * x * y + 1)])
    noise = rng.normal(0, 12, (3, size, size)).astype(np.float32)
    image = np.clip(128 + 90 * base + noise, 0, 255).astype(np.uint8)
    valid = np.ones((size, size), bool)
    valid[:, : size // 4] = False
    image[:, ~valid] = 0
    return image, valid


def smallest_overview_read(path, reads=20):
    """
    Mean seconds to open ``path`` and read a 256 x 256 window of its smallest
    overview, the overview count, and the byte offset of that overview's first
    tile (GDAL's BLOCK_OFFSET_0_0 in the TIFF domain): what a reader over HTTP
    range requests must skip or fetch past to reach it.
    """
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as src:
        levels = len(src.overviews(1))
        offset = int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1, ovr=levels - 1))
    start = time.perf_counter()
    for _ in range(reads):
        with rasterio.open(path, overview_level=levels - 1) as src:
            w, h = min(256, src.width), min(256, src.height)
            src.read(window=Window(src.width - w, 0, w, h))
    return (time.perf_counter() - start) / reads, levels, offset


def part_cog(args, work):
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rio_cogeo.cogeo import cog_validate

    from guided_diffusion.io.geotiff import GeoTiffWriter

    size = args.cog_size
    image, valid = rgb_result(size)
    georef = {"crs": CRS.from_epsg(32632), "transform": from_origin(500000, 5400000, 10, 10)}
    rows = []
    for name, cog in (("plain", False), ("COG", True)):
        folder = os.path.join(work, name)
        os.makedirs(folder)
        path = os.path.join(folder, "result.tif")
        with FolderPeak(folder) as disk:
            start = time.perf_counter()
            with GeoTiffWriter(path, 3, size, size, np.uint8, georef, mask=True, cog=cog,
                               names=["red", "green", "blue"]) as out:  # fmt: skip
                for top in range(0, size, 256):
                    out.write(top, image[:, top : top + 256], valid[top : top + 256])
            seconds = time.perf_counter() - start
        is_cog, errors, _ = cog_validate(path, quiet=True)
        read_s, levels, offset = smallest_overview_read(path)
        rows.append((name, f"{seconds:.2f}", f"{os.path.getsize(path) / 2**20:.2f}",
                     f"{out.bytes_needed / 2**20:.2f}", f"{disk.peak / 2**20:.2f}",
                     "valid" if is_cog else f"invalid ({len(errors)} errors)", levels,
                     f"{offset / 2**10:,.0f}", f"{read_s * 1e3:.2f}"))  # fmt: skip
    header = ("output", "write s", "size MiB", "bytes_needed MiB", "peak disk MiB",
              "cog_validate", "overviews", "smallest overview at KiB",
              "its 256 px read ms")  # fmt: skip
    notes = [
        f"{size} x {size} x 3 uint8, the left quarter without data, written through "
        "GeoTiffWriter(mask=True) 256 rows at a time, deflate, 256 px tiles.",
        "peak disk: the most bytes the output's folder held while writing (polled "
        "every 5 ms, so a short-lived peak can be missed).",
        "smallest overview at: the byte offset of its first tile in the file (a COG "
        "puts overviews first, so a reader over HTTP finds them in the first "
        "requests); read: open and read a 256 x 256 window of it from the local disk, "
        "mean of 20 (local reads hide what the layout saves over a network).",
    ]
    return "Issue 23 COG: plain GeoTIFF vs Cloud-Optimized GeoTIFF", \
        common.markdown_table(header, rows), notes  # fmt: skip


# -- sentinel1 ---------------------------------------------------------------------------

NAME = "S1A_IW_GRDH_1SDV_20230101T052000_20230101T052025_046582_059545_ABCD"
STEM = "s1a-iw-grd-{pol}-20230101t052000-20230101t052025-046582-059545-{n:03d}"


def axis_nodes(length, step):
    """Nodes every ``step`` from 0, the last one at length - 1."""
    return sorted(set(range(0, length, step)) | {length - 1})


def write_product(folder, height, width):
    """A GRD product (VV, VH) of height x width digital numbers, as the test's
    builder (tests/test_sentinel1.py) writes it, at a realistic size."""
    import rasterio

    safe = os.path.join(folder, NAME + ".SAFE")
    for sub in ("measurement", "annotation/calibration"):
        os.makedirs(os.path.join(safe, sub))
    with open(os.path.join(safe, "manifest.safe"), "w") as f:
        f.write('<?xml version="1.0"?><xfdu:XFDU xmlns:xfdu="urn:ccsds:schema:xfdu:1">'
                "<dataObjectSection/></xfdu:XFDU>")  # fmt: skip
    grid = [(line, pixel) for line in axis_nodes(height, height // 9 or 1)
            for pixel in axis_nodes(width, width // 20 or 1)]  # fmt: skip
    points = "".join(
        f"<geolocationGridPoint><line>{line}</line><pixel>{pixel}</pixel>"
        f"<latitude>{45.0 - line * 9.0e-5 + pixel * 1.0e-5}</latitude>"
        f"<longitude>{9.0 + pixel * 1.27e-4 + line * 1.0e-5}</longitude>"
        "<height>0</height></geolocationGridPoint>"
        for line, pixel in grid
    )
    lines, pixels = axis_nodes(height, 200), axis_nodes(width, 40)
    rng = np.random.default_rng(0)
    for n, pol in enumerate(("vv", "vh"), 1):
        stem = STEM.format(pol=pol, n=n)
        with open(os.path.join(safe, "annotation", stem + ".xml"), "w") as f:
            f.write(
                f"<product><adsHeader><polarisation>{pol.upper()}</polarisation>"
                "</adsHeader><imageAnnotation><imageInformation><rangePixelSpacing>"
                "1.000000e+01</rangePixelSpacing><azimuthPixelSpacing>1.000000e+01"
                f"</azimuthPixelSpacing><numberOfSamples>{width}</numberOfSamples>"
                f"<numberOfLines>{height}</numberOfLines></imageInformation>"
                f'</imageAnnotation><geolocationGrid><geolocationGridPointList count="'
                f'{len(grid)}">{points}</geolocationGridPointList></geolocationGrid>'
                "</product>"
            )
        vectors = "".join(
            f"<calibrationVector><azimuthTime>2023-01-01T05:20:00</azimuthTime>"
            f"<line>{line}</line><pixel count=\"{len(pixels)}\">"
            f"{' '.join(map(str, pixels))}</pixel><sigmaNought count=\"{len(pixels)}\">"
            + " ".join(f"{500 + 0.01 * p + 0.02 * line:.4f}" for p in pixels)
            + "</sigmaNought></calibrationVector>"
            for line in lines
        )
        with open(os.path.join(safe, "annotation", "calibration",
                               f"calibration-{stem}.xml"), "w") as f:  # fmt: skip
            f.write(f'<calibration><calibrationVectorList count="{len(lines)}">'
                    f"{vectors}</calibrationVectorList></calibration>")  # fmt: skip
        dn = rng.integers(20, 400, (height, width)).astype(np.uint16)
        dn[:, :50] = 0  # the swath's edge: no data
        measurement = os.path.join(safe, "measurement", stem + ".tiff")
        with rasterio.open(measurement, "w", driver="GTiff", width=width, height=height,
                           count=1, dtype="uint16") as dst:  # fmt: skip
            dst.write(dn, 1)
    return safe


def zip_product(safe):
    path = safe[: -len(".SAFE")] + ".zip"
    root = os.path.dirname(safe)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for folder, _, files in os.walk(safe):
            for name in sorted(files):
                full = os.path.join(folder, name)
                z.write(full, os.path.relpath(full, root))
    return path


def sigma0_run(given, output, traced=False):
    """write_sigma0 of VV and VH: (seconds, peak traced MiB or None)."""
    from guided_diffusion.io import sentinel1

    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    sentinel1.write_sigma0(sentinel1.open_product(given), output, ("VV", "VH"))
    seconds = time.perf_counter() - start
    peak = None
    if traced:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    os.remove(output)
    return seconds, peak


def sigma0_rows(args, work):
    """The table's rows: each product size, from its folder and its zip."""
    width, height = args.s1_size
    rows = []
    for h in (height, height // 4):
        folder = os.path.join(work, f"s1_{h}")
        os.makedirs(folder)
        safe = write_product(folder, h, width)
        packed = {"folder": safe, "zip": zip_product(safe)}
        for name, given in packed.items():
            out = os.path.join(folder, "sigma0.tif")
            seconds, _ = sigma0_run(given, out)
            _, peak = sigma0_run(given, out, traced=True)
            rows.append((f"{width} x {h}", name, f"{seconds:.2f}",
                         f"{width * h / 1e6 / seconds:.2f}", f"{peak:.1f}"))  # fmt: skip
    return rows


def part_sentinel1(args, work):
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # the DN files have none
        rows = sigma0_rows(args, work)
    header = ("DN pixels", "read from", "seconds", "MP/s", "peak traced MiB")
    notes = [
        "io/sentinel1.write_sigma0(open_product(PATH), OUT, ('VV', 'VH')), 512 rows "
        "a time: VV and VH sigma0 (float32, deflate) with the GCPs; MP/s counts one "
        "polarisation's pixels.",
        "calibration vectors every 200 lines, nodes every 40 pixels; zip deflated. "
        "peak: tracemalloc's in a second run (numpy's arrays; not GDAL's block cache).",
    ]
    return "Issue 23 Sentinel-1: sigma0 from a GRD product as delivered", \
        common.markdown_table(header, rows), notes  # fmt: skip


# -- archive -----------------------------------------------------------------------------


def part_archive(args, work):
    from guided_diffusion.demo.sen12ms import make_scene

    inputs = os.path.join(work, "archive_in")
    outputs = os.path.join(work, "archive_out")
    for i in range(4):
        make_scene(os.path.join(work, "made"), height=64, width=64, seed=i, name=f"s{i}")
        os.makedirs(inputs, exist_ok=True)
        shutil.copy(os.path.join(work, "made", f"s{i}_s1.tif"), inputs)
    flags = ("--input", inputs, "--output", outputs)
    first = translate(args, *flags)
    again = translate(args, *flags)
    done = sorted(os.listdir(outputs))
    rows = [("first run", 4, f"{first:.1f}"), ("rerun (all skipped)", 4, f"{again:.1f}")]
    notes = [
        f"4 scenes of 64 x 64 (make_scene seeds 0-3), translate_scene.py --input "
        f"FOLDER --output FOLDER, 1 process, {args.sampler} {args.respacing} steps; outputs: "
        f"{', '.join(done)}.",
        "seconds of the whole process, model loading and Python's start included.",
    ]
    return "Issue 23 archive: one run over a folder", \
        common.markdown_table(("run", "scenes", "seconds"), rows), notes  # fmt: skip


def main():
    args = parse_args()
    work = tempfile.mkdtemp(prefix="bench_gis_")
    try:
        for part in args.parts:
            start = time.perf_counter()
            folder = os.path.join(work, part)
            os.makedirs(folder)
            try:
                title, table, notes = globals()[f"part_{part}"](args, folder)
            except Exception as err:  # one failed part is a line, not the run's end
                title, table, notes = f"Issue 23 {part}", "failed", [common.short_error(err)]
            notes.append(f"part took {time.perf_counter() - start:.0f} s.")
            common.report(title, table, notes, args.results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated: {', '.join(PARTS)}")  # fmt: skip
    parser.add_argument("--sampler", default="dpm++2m", help="masks and archive: the sampler")
    parser.add_argument("--respacing", default="20",
                        help="masks and archive: the sampler's steps")  # fmt: skip
    parser.add_argument("--scene_seed", type=int, default=0, help="masks: make_scene's seed")
    parser.add_argument("--cog_size", type=int, default=2048, help="cog: the side")
    parser.add_argument("--s1_size", default="4000,3000",
                        help="sentinel1: WIDTH,HEIGHT of the digital numbers")  # fmt: skip
    parser.add_argument("--results", default=common.DEFAULT_RESULTS,
                        help="append the tables here ('' for nowhere)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="ddim 2 steps, a 512 px COG, a 1000 x 800 product: seconds")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.sampler, args.respacing = "ddim", "ddim2"
        args.cog_size, args.s1_size = 512, "1000,800"
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    try:
        args.s1_size = tuple(int(v) for v in args.s1_size.split(","))
        assert len(args.s1_size) == 2 and min(args.s1_size) >= 200
    except (ValueError, AssertionError):
        parser.error("--s1_size: give WIDTH,HEIGHT, each at least 200")
    return args


if __name__ == "__main__":
    main()
