"""
Procedural SAR/optical scene pairs for tests and demos.

Real SAR-to-optical datasets (SEN1-2, QXS-SAROPT, ...) cannot be shipped with
the project, so this module renders rural scenes with parcels of farmland,
forest, water, roads and villages as an RGB image, and simulates the radar
view of the same ground:

* every class has a noise-free backscatter sigma0 in linear intensity (water
  very dark, roads dark, soil and crops middle, forest higher, roofs bright);
* building walls that face the sensor form a dihedral with the ground and
  return a very bright double-bounce line, the far side lies in radar shadow;
* multilook speckle multiplies the intensity by Gamma(L, 1/L) noise;
* on request (generate_scene's cross_pol) the cross-polarised VH channel is
  simulated too: every class has a VH level as well, and VH tells apart the
  field classes that share one VV level (bare ploughed soil scatters little
  into the cross channel, a green canopy a lot);
* the result is converted to dB, clipped and scaled to 8 bits the way SEN1-2
  stores Sentinel-1 images (bright, low contrast).

Several classes share one backscatter level but not one colour (four kinds of
field, two kinds of roof), so the SAR image alone cannot decide every colour
and a model has something to learn beyond a lookup table.

Only numpy and Pillow are used (and tqdm for a progress bar); every scene is a
deterministic function of the numpy Generator it is drawn from.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm


@dataclass(frozen=True)
class SceneClass:
    """
    One land-cover class of the generator.

    :param id: value of the class in the saved class maps.
    :param name: short identifier.
    :param rgb: mean optical colour before per-parcel and per-pixel variation.
    :param sigma0: noise-free radar backscatter, linear intensity (VV, the
        co-polarised channel of Sentinel-1).
    :param sigma0_vh: noise-free cross-polarised (VH) backscatter, linear
        intensity.
    """

    id: int
    name: str
    rgb: tuple
    sigma0: float
    sigma0_vh: float

    @property
    def sigma0_db(self):
        return 10.0 * float(np.log10(self.sigma0))

    @property
    def sigma0_vh_db(self):
        return 10.0 * float(np.log10(self.sigma0_vh))


# Backscatter levels are typical C-band VV values (Sentinel-1): calm water
# -25 dB, asphalt -19 dB, smooth dry soil -17 dB, rough ploughed soil and
# crops -13 dB, built-up ground -11 dB, forest canopy -9 dB and roofs -6 dB
# (the bright returns of towns come from double bounce, below). The four
# field classes and the two roof classes share a level on purpose.
_FIELD_SIGMA0 = 0.05
_ROOF_SIGMA0 = 0.25


def _from_db(db):
    return 10.0 ** (db / 10.0)


# Cross-polarised (VH) levels. A wave comes back in the other polarisation
# only when the target depolarises it: smooth surfaces hardly do, a volume of
# leaves and stems does a lot. So VH separates what VV lumps together, and the
# four field classes that share one VV level get four VH levels.
# * Calm water and asphalt scatter specularly or nearly so; their VH lies
#   below the sensor's noise-equivalent sigma0, which the ESA Sentinel-1 SAR
#   Technical Guide ("SAR instrument performance") specifies as -22 dB or
#   better. What is measured there is the noise floor, the -25 dB that radar
#   shadow has in this model (SHADOW_SIGMA0 below).
# * Bare soil: in the empirical bare-soil model of Oh, Sarabandi and Ulaby
#   (1992, IEEE Trans. Geosci. Remote Sens. 30(2), fitted to truck-mounted
#   L-, C- and X-band polarimetric measurements of bare fields) the
#   cross-polarised ratio is q = VH / VV = 0.23 sqrt(G0) (1 - exp(-ks)), G0
#   the Fresnel reflectivity at nadir, ks the roughness in wavenumbers. Rough
#   moist ploughed soil (ks ~ 2, permittivity ~ 15) gives q ~ -9 dB, so
#   -13 - 9 = -22 dB. Smooth dry soil (ks ~ 0.5, permittivity ~ 4) gives
#   q ~ -15 dB, which would put it under the noise floor; it is set at
#   -24 dB, the VH that Harfenmeister, Spengler and Weltzien (2019, Remote
#   Sens. 11(13) 1569) measured with Sentinel-1 on wheat and barley fields in
#   Germany in March 2018, dry soil with little cover.
# * Crops: VH grows with the water content and biomass of the canopy
#   (Vreugdenhil et al. 2018, Remote Sens. 10(9) 1396: Sentinel-1 VV, VH and
#   VH/VV against in-situ vegetation water content, biomass and LAI of corn,
#   oilseed rape and winter cereals in Austria). Veloso et al. (2017, Remote
#   Sens. Environ. 199, 415-426: Sentinel-1 time series of maize, sunflower,
#   soybean, wheat and rapeseed fields in south-west France) report VH rising
#   by about 10 dB from the bare soil after sowing (near -25 dB) to the
#   green canopy at its peak (near -15 dB): crop_green -16 dB.
# * Ripening cereals (crop_yellow): Harfenmeister et al. (2019) measured VH
#   of -19 dB (wet 2017) to -24 dB (dry 2018) on wheat and barley in March
#   and minima of -22 to -24 dB in May, rising again towards harvest:
#   crop_yellow -20 dB.
# * Grassland, a lower and sparser canopy than a green crop and a greener
#   one than a ripe cereal, is placed between them at -18 dB (no figure for
#   grass alone was found; an interpolation by biomass).
# * Forest, the strongest volume scatterer of the scene: -14 dB, inside the
#   -12 to -15 dB range commonly quoted for Sentinel-1 VH over closed
#   temperate forest (Rueetschi, Schaepman and Small 2018, Remote Sens.
#   10(1) 55, follow such VV and VH series over beech and spruce stands);
#   no single paper's number was checked for this value.
# * Built-up ground (gardens, yards, paving) -17 dB and roofs -13 dB: 6 to
#   7 dB under VV like the bare surfaces above, the roofs sharing one level
#   as in VV. Not taken from a measurement: chosen by that ratio.


# Sentinel-1's noise floor in this model (-25 dB, see SHADOW_SIGMA0)
_NOISE_FLOOR_SIGMA0 = 0.003
_ROOF_SIGMA0_VH = _from_db(-13.0)
CLASSES = (
    SceneClass(0, "water", (30, 50, 64), 0.003, _NOISE_FLOOR_SIGMA0),
    SceneClass(1, "road", (152, 150, 142), 0.012, _NOISE_FLOOR_SIGMA0),
    SceneClass(2, "bare_soil", (166, 138, 104), 0.02, _from_db(-24.0)),
    SceneClass(3, "ploughed", (104, 78, 58), _FIELD_SIGMA0, _from_db(-22.0)),
    SceneClass(4, "crop_green", (58, 124, 46), _FIELD_SIGMA0, _from_db(-16.0)),
    SceneClass(5, "crop_yellow", (198, 178, 90), _FIELD_SIGMA0, _from_db(-20.0)),
    SceneClass(6, "grassland", (130, 170, 86), _FIELD_SIGMA0, _from_db(-18.0)),
    SceneClass(7, "forest", (34, 66, 36), 0.12, _from_db(-14.0)),
    SceneClass(8, "urban_ground", (122, 118, 108), 0.08, _from_db(-17.0)),
    SceneClass(9, "roof_red", (170, 80, 62), _ROOF_SIGMA0, _ROOF_SIGMA0_VH),
    SceneClass(10, "roof_grey", (150, 152, 158), _ROOF_SIGMA0, _ROOF_SIGMA0_VH),
)
_ID = {c.name: c.id for c in CLASSES}
_CLASS_RGB = np.array([c.rgb for c in CLASSES], dtype=np.float64)
_CLASS_SIGMA0 = np.array([c.sigma0 for c in CLASSES], dtype=np.float64)
_CLASS_SIGMA0_VH = np.array([c.sigma0_vh for c in CLASSES], dtype=np.float64)
_ROOF_IDS = (_ID["roof_red"], _ID["roof_grey"])
_FIELD_IDS = (_ID["ploughed"], _ID["crop_green"], _ID["crop_yellow"], _ID["grassland"])

# The dihedral formed by a wall and the ground returns far more than any
# surface (+7 dB, 13 dB above the roofs); radar shadow receives nothing, so
# only the instrument noise floor (about -25 dB for Sentinel-1) remains.
DOUBLE_BOUNCE_SIGMA0 = 5.0
SHADOW_SIGMA0 = 0.003
# In cross-pol the dihedral is much weaker: one whose walls run along the
# track has a diagonal scattering matrix and returns no VH at all; a wall
# turned by a polarisation orientation angle theta leaks
# |S_hv / S_vv|^2 = tan^2(2 theta) of it, about -11 dB at theta = 8 degrees.
# So VH double bounce is set 10 dB under VV's (-3 dB), still 10 dB above the
# roofs. Shadow receives nothing in either channel: the noise floor.
DOUBLE_BOUNCE_SIGMA0_VH = 0.5
SHADOW_SIGMA0_VH = SHADOW_SIGMA0

# SEN1-2 pairs measured in this project have 8-bit SAR means of 200-230 and a
# standard deviation of about 16 per image. This 56 dB window reproduces that:
# water lands near 145, fields 200, forest 220, roofs 240, and double bounce
# saturates.
DB_RANGE = (-58.0, -2.0)

# Smaller scenes cannot hold a parcel, a road and a house side by side.
MIN_SIZE = 16

# Sentinel-1 looks to the right of its track; on an ascending pass the sensor
# is west of the scene. Sentinel-2 passes at 10:30 local time, so in the
# northern hemisphere the sun stands in the south-east (x east, y south).
# SENSOR_SIDES gives, per side, the (dy, dx) step from a pixel's neighbour
# towards the sensor to the pixel itself.
SENSOR_SIDE = "west"
SENSOR_SIDES = {"west": (0, 1), "east": (0, -1), "north": (1, 0), "south": (-1, 0)}
_SUN = np.array([1.0, 1.0]) / np.sqrt(2.0)

# Share of land use among parcels, by class name.
_PARCEL_USE = {
    "crop_green": 0.22,
    "crop_yellow": 0.15,
    "grassland": 0.18,
    "ploughed": 0.13,
    "bare_soil": 0.1,
    "forest": 0.22,
}

# Chance that a boundary of the field grid is a road, by depth of the cut
# (the first cuts split the whole scene and become the main roads).
_ROAD_CHANCE = (0.5, 0.3, 0.1)

# Optical variation: the per-parcel brightness and tint spread (season, soil,
# crop stage) and the strength of within-parcel texture, per class. These set
# how much of the colour variance the class map explains (see
# explained_variance_share) and were tuned to put it near 0.7.
_PARCEL_BRIGHTNESS_STD = 0.2
_PARCEL_TINT_STD = 0.09
# Water, asphalt and towns vary far less from place to place than vegetation.
_REGION_SPREAD = np.array([0.3, 0.3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.4, 0.6, 0.6])
_TEXTURE_AMP = np.array(
    [0.04, 0.06, 0.1, 0.12, 0.12, 0.1, 0.12, 0.35, 0.18, 0.06, 0.06]
)
_PIXEL_NOISE_STD = 5.0
_SCENE_BRIGHTNESS_STD = 0.06
_ROOF_SHADE = 0.75
_CAST_SHADOW = 0.5


# ---------------------------------------------------------------------------
# Geometry


def _clip_halfplane(poly, point, normal):
    """
    Keep the part of a convex polygon where (x - point) . normal >= 0.

    :param poly: (K, 2) vertices in order.
    :return: (vertices of the kept part, the cut points on the line).
    """
    dist = (poly - point) @ normal
    kept, cut = [], []
    for i in range(len(poly)):
        j = (i + 1) % len(poly)
        if dist[i] >= 0:
            kept.append(poly[i])
        if (dist[i] >= 0) != (dist[j] >= 0):
            crossing = poly[i] + (poly[j] - poly[i]) * dist[i] / (dist[i] - dist[j])
            kept.append(crossing)
            cut.append(crossing)
    return np.array(kept), cut


def _partition(rng, poly, parcel_size, depth, leaves, cuts):
    """
    Split a convex polygon recursively into field parcels.

    Cuts run across the longer side of each piece, slightly tilted, so the
    parcels are the near-rectangular strips and blocks of real farmland. The
    coordinates are those of the field grid (already rotated).
    """
    extent = poly.max(axis=0) - poly.min(axis=0)
    axis = int(np.argmax(extent))
    if extent[axis] < parcel_size * rng.uniform(1.2, 2.0):
        leaves.append(poly)
        return
    lo, hi = poly[:, axis].min(), poly[:, axis].max()
    point = poly.mean(axis=0)
    point[axis] = lo + (hi - lo) * rng.uniform(0.3, 0.7)
    tilt = rng.normal(0.0, 0.07)
    normal = np.zeros(2)
    normal[axis], normal[1 - axis] = np.cos(tilt), np.sin(tilt)
    first, cut = _clip_halfplane(poly, point, normal)
    second, _ = _clip_halfplane(poly, point, -normal)
    if len(cut) == 2:
        cuts.append((np.array(cut), depth))
    for piece in (first, second):
        if len(piece) >= 3:
            _partition(rng, piece, parcel_size, depth + 1, leaves, cuts)


def _blob(rng, center, radius, num_vertices=28):
    """Vertices of an irregular closed outline (lakes, woods)."""
    angle = np.linspace(0.0, 2 * np.pi, num_vertices, endpoint=False)
    wobble = np.ones_like(angle)
    for harmonic in (2, 3, 5):
        wobble += rng.normal(0.0, 0.32 / harmonic) * np.cos(
            harmonic * angle + rng.uniform(0, 2 * np.pi)
        )
    r = radius * np.clip(wobble, 0.35, None)
    return np.stack([center[0] + r * np.cos(angle), center[1] + r * np.sin(angle)], 1)


def _river(rng, size, width):
    """Centre line of a meandering river that crosses the whole scene."""
    heading = rng.uniform(0, np.pi)
    along = np.array([np.cos(heading), np.sin(heading)])
    across = np.array([-along[1], along[0]])
    center = size / 2 + rng.uniform(-0.25, 0.25, 2) * size
    t = np.linspace(-0.9, 0.9, 48) * size
    wavelength = size * rng.uniform(0.5, 1.1)
    offset = rng.uniform(0.05, 0.12) * size * np.sin(
        2 * np.pi * t / wavelength + rng.uniform(0, 2 * np.pi)
    ) + rng.uniform(0.0, 0.04) * size * np.sin(6 * np.pi * t / wavelength)
    return center + t[:, None] * along + offset[:, None] * across


def _points(poly):
    return [(float(x), float(y)) for x, y in poly]


def _shift(mask, dy, dx, edge=True):
    """
    mask moved by (dy, dx) pixels: out[y, x] = mask[y - dy, x - dx].

    :param edge: pixels moved in from outside copy the border (True) or are
        False.
    """
    pad = ((abs(dy), abs(dy)), (abs(dx), abs(dx)))
    out = np.pad(mask, pad, mode="edge") if edge else np.pad(mask, pad)
    h, w = mask.shape
    return out[abs(dy) - dy : abs(dy) - dy + h, abs(dx) - dx : abs(dx) - dx + w]


def _binomial_blur(img, passes=1):
    """Separable [1, 2, 1] / 4 smoothing (sigma 0.71 px per pass) of axes 0 and 1."""
    for _ in range(passes):
        for axis in (0, 1):
            pad = [(0, 0)] * img.ndim
            pad[axis] = (1, 1)
            p = np.pad(img, pad, mode="edge")
            n = img.shape[axis]
            img = (
                0.25 * p.take(range(0, n), axis)
                + 0.5 * p.take(range(1, n + 1), axis)
                + 0.25 * p.take(range(2, n + 2), axis)
            )
    return img


# ---------------------------------------------------------------------------
# Scene layout


class _Layout:
    """
    The drawn regions of one scene: a region-id image and, per region, its
    class and rendering parameters.
    """

    def __init__(self, size, feature_size=None):
        self.size = size
        self.feature_size = size if feature_size is None else feature_size
        self.image = Image.new("I", (size, size), 0)
        self.draw = ImageDraw.Draw(self.image)
        self.cls = [_ID["grassland"]]
        self.stripes = [None]
        self.roof = [None]

    def add(self, cls, stripes=None, roof=None):
        self.cls.append(cls)
        self.stripes.append(stripes)
        self.roof.append(roof)
        return len(self.cls) - 1

    def polygon(self, poly, cls, **params):
        self.draw.polygon(_points(poly), fill=self.add(cls, **params))

    def line(self, points, cls, width):
        self.draw.line(_points(points), fill=self.add(cls), width=width, joint="curve")


def _layout(rng, size, feature_size=None):
    """
    Draw the land cover of one scene. The scale of features follows the size, or
    ``feature_size``: then the scene holds features as large as those of a scene
    of that size, as many as its area holds (a large scene at the scale of
    small training patches).
    """
    # Features shrink more slowly than the scene, so a small scene shows a few
    # parcels a handful of pixels wide instead of a crowd of single pixels.
    f = size if feature_size is None else feature_size
    # how many scenes of the feature size the area holds, and along one side
    area, side = (size / f) ** 2, size / f
    parcel_size = 18.0 * (f / 64) ** 0.6
    road_width = max(1, round(f / 96))
    layout = _Layout(size, f)
    center = np.array([size / 2, size / 2])

    # 1. farmland: a tilted grid of parcels covering the scene
    angle = rng.uniform(0, np.pi / 2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    half = 0.75 * size
    square = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    leaves, cuts = [], []
    _partition(rng, square, parcel_size, 0, leaves, cuts)
    names, weights = zip(*_PARCEL_USE.items(), strict=True)
    weights = np.array(weights) / sum(weights)
    for leaf in leaves:
        poly = leaf @ rot.T + center
        cls = _ID[names[rng.choice(len(names), p=weights)]]
        stripes = None
        if cls in _FIELD_IDS:
            # rows run along one side of the parcel
            stripe_angle = angle + rng.integers(2) * np.pi / 2 + rng.normal(0, 0.03)
            period = rng.uniform(2.5, 3.5) + f / 64
            stripes = (stripe_angle, period, rng.uniform(0, 2 * np.pi))
        layout.polygon(poly, cls, stripes=stripes)

    # 2. woods with ragged edges over the fields
    for _ in range(rng.poisson(0.5 * (f / 64) ** 0.8 * area)):
        radius = parcel_size * rng.uniform(0.6, 1.4)
        layout.polygon(_blob(rng, rng.uniform(0, size, 2), radius), _ID["forest"])

    # 3. water: lakes and a river
    lakes = int(rng.random() < 0.25) if feature_size is None else rng.poisson(0.25 * area)
    for _ in range(lakes):
        radius = parcel_size * rng.uniform(0.4, 0.9)
        layout.polygon(
            _blob(rng, rng.uniform(0.1, 0.9, 2) * size, radius), _ID["water"]
        )
    # a river crosses the scene; a large one has more, about one per 2.5 sides
    rivers = int(rng.random() < 0.4) if feature_size is None else max(
        1, rng.poisson(0.4 * side)
    )
    for _ in range(rivers):
        width = max(2, round((2.0 + f / 40) * rng.uniform(0.7, 1.3)))
        layout.line(_river(rng, size, width), _ID["water"], width)

    # 4. roads along the main field boundaries (they cross rivers on bridges)
    for segment, depth in cuts:
        if depth < len(_ROAD_CHANCE) and rng.random() < _ROAD_CHANCE[depth]:
            layout.line(segment @ rot.T + center, _ID["road"], road_width)

    # 5. villages: built-up ground along a main street, houses with red or
    # grey roofs in rows aligned with the field grid, away from water
    for _ in range(rng.poisson(0.45 * (f / 64) ** 0.75 * area)):
        extent = parcel_size * rng.uniform(1.0, 2.0, 2)
        for _ in range(10):
            middle = rng.uniform(0.15, 0.85, 2) * size
            if not _covers(layout, middle, extent, rot, _ID["water"]):
                _village(rng, layout, middle, extent, rot, 3.0 + f / 50, road_width)
                break
    return layout


def _covers(layout, middle, extent, rot, cls):
    """Whether a grid-aligned rectangle already contains class cls (5 x 5 probes)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-0.5, 0.5, 5)] * 2), -1).reshape(-1, 2)
    probes = np.round((grid * extent) @ rot.T + middle).astype(int)
    probes = probes[np.all((probes >= 0) & (probes < layout.size), axis=1)]
    # 25 pixels read one by one: converting the whole layout image for each probe
    # made large scenes (4096 px) take hours
    regions = [layout.image.getpixel((int(x), int(y))) for x, y in probes]
    return bool(np.any(np.array(layout.cls)[np.array(regions, int)] == cls))


def _village(rng, layout, middle, extent, rot, house, road_width):
    """Built-up ground, a main street and rows of houses on both sides of it."""
    half = extent / 2
    box = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    layout.polygon(box @ rot.T + middle, _ID["urban_ground"])
    share_red = rng.uniform(0.2, 0.8)
    step = house * rng.uniform(1.4, 1.8)
    first_row = road_width / 2 + 1 + house / 2
    rows = np.arange(first_row, half[1] - house / 2, step)
    for v in np.concatenate([rows, -rows]):
        for u in np.arange(-half[0] + step / 2, half[0] - house / 2, step):
            if rng.random() < 0.15:
                continue
            du, dv = house * rng.uniform(0.75, 1.25, 2) / 2
            if abs(u) + du > half[0] - 0.5 or abs(v) + dv > half[1] - 0.5:
                continue
            corners = np.array(
                [[u - du, v - dv], [u + du, v - dv], [u + du, v + dv], [u - du, v + dv]]
            )
            poly = corners @ rot.T + middle
            # the ridge runs along the longer side; the slopes face across it
            slope = rot[:, 1] if du > dv else rot[:, 0]
            if slope @ _SUN < 0:
                slope = -slope
            cls = _ID["roof_red"] if rng.random() < share_red else _ID["roof_grey"]
            layout.polygon(poly, cls, roof=(poly.mean(0), slope))
    street = np.array([[-half[0], 0.0], [half[0], 0.0]]) @ rot.T + middle
    layout.line(street, _ID["road"], road_width)


# ---------------------------------------------------------------------------
# Rendering


def _render_optical(rng, layout, regions, cls_map):
    """Colour the regions and add row stripes, texture, shading and noise."""
    size = layout.size
    num_regions = len(layout.cls)
    region_cls = np.array(layout.cls)
    spread = _REGION_SPREAD[region_cls][:, None]
    colour = _CLASS_RGB[region_cls] * rng.normal(
        1.0, _PARCEL_BRIGHTNESS_STD * spread, (num_regions, 1)
    )
    colour *= rng.normal(1.0, _PARCEL_TINT_STD * spread, (num_regions, 3))
    img = colour[regions]

    y, x = np.mgrid[0:size, 0:size] + 0.5
    gain = np.ones((size, size))
    stripe_amp = np.zeros(num_regions)
    stripe_dir = np.zeros((num_regions, 2))
    stripe_freq = np.zeros(num_regions)
    stripe_phase = np.zeros(num_regions)
    for r, params in enumerate(layout.stripes):
        if params is not None:
            stripe_angle, period, phase = params
            stripe_amp[r] = rng.uniform(0.04, 0.14)
            stripe_dir[r] = np.cos(stripe_angle), np.sin(stripe_angle)
            stripe_freq[r] = 2 * np.pi / period
            stripe_phase[r] = phase
    proj = x * stripe_dir[regions, 0] + y * stripe_dir[regions, 1]
    gain *= 1 + stripe_amp[regions] * np.sin(
        stripe_freq[regions] * proj + stripe_phase[regions]
    )

    texture = _binomial_blur(rng.normal(0.0, 1.0, (size, size)), passes=2)
    texture /= texture.std() + 1e-12
    gain *= 1 + _TEXTURE_AMP[cls_map] * texture

    # a roof slope turned away from the sun is darker
    roof_center = np.zeros((num_regions, 2))
    roof_slope = np.zeros((num_regions, 2))
    is_roof = np.zeros(num_regions, bool)
    for r, params in enumerate(layout.roof):
        if params is not None:
            roof_center[r], roof_slope[r] = params
            is_roof[r] = True
    facing = (x - roof_center[regions, 0]) * roof_slope[regions, 0] + (
        y - roof_center[regions, 1]
    ) * roof_slope[regions, 1]
    gain[is_roof[regions] & (facing < 0)] *= _ROOF_SHADE

    # houses cast shadows away from the sun onto the ground
    houses = is_roof[regions]
    shadow = np.zeros_like(houses)
    for k in range(1, 1 + max(1, round(layout.feature_size / 96))):
        shadow |= _shift(houses, -k, -k, edge=False)
    gain[shadow & ~houses] *= _CAST_SHADOW

    # haze and season shift the whole scene a little
    img = img * gain[..., None] * rng.normal(1.0, _SCENE_BRIGHTNESS_STD)
    img = _binomial_blur(img)
    img += rng.normal(0.0, _PIXEL_NOISE_STD, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def check_dataset_arguments(num_train, num_test, image_size, seed, looks):
    """Refuse what no dataset writer can make, with a ValueError naming the value."""
    if num_train < 1 or num_test < 0:
        raise ValueError(
            f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}"
        )
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if image_size < MIN_SIZE:
        raise ValueError(
            f"image size must be at least {MIN_SIZE} pixels, got {image_size}"
        )
    _check_looks(looks)


def _check_looks(looks):
    if not looks > 0:
        raise ValueError(
            f"looks must be positive, got {looks}; Sentinel-1 GRD has about 4"
        )


def simulate_sar(
    cls_map,
    rng,
    looks=4,
    *,
    regions=None,
    region_jitter_db=1.0,
    sensor_side=SENSOR_SIDE,
    shadow_length=1,
    db_range=DB_RANGE,
):
    """
    Simulate the Sentinel-1-like radar image of a class map.

    :param cls_map: (H, W) integer class ids (see CLASSES).
    :param rng: numpy Generator for the speckle and the per-region jitter.
    :param looks: number of looks L of the multilook speckle; intensity is
        multiplied by Gamma(shape=L, scale=1/L) noise (mean 1, variance 1/L).
    :param regions: optional (H, W) ids of the drawn regions (parcels, houses);
        when given, each region's backscatter is moved by a random offset of
        std region_jitter_db dB, as moisture and crop stage vary between fields.
    :param region_jitter_db: see regions.
    :param sensor_side: where the radar is ("west", "east", "north", "south");
        roof edges on that side get the double-bounce return, the far side
        of each building gets radar shadow.
    :param shadow_length: length of the radar shadow behind a building, pixels.
    :param db_range: (low, high) dB mapped to 0 and 255.
    :return: (sar_uint8 (H, W) uint8, sar_linear (H, W) float32 speckled
        intensity, sigma0 (H, W) float32 noise-free backscatter).
    """
    _check_looks(looks)
    if sensor_side not in SENSOR_SIDES:
        raise ValueError(
            f"sensor_side must be one of {sorted(SENSOR_SIDES)}, got {sensor_side!r}"
        )
    cls_map = np.asarray(cls_map)
    if cls_map.max(initial=0) >= len(CLASSES) or cls_map.min(initial=0) < 0:
        raise ValueError(f"class ids must lie in 0..{len(CLASSES) - 1}")
    sigma0 = _CLASS_SIGMA0[cls_map]
    if regions is not None:
        regions = np.asarray(regions)
        jitter = rng.normal(0.0, region_jitter_db, int(regions.max()) + 1)
        sigma0 = sigma0 * 10.0 ** (jitter[regions] / 10.0)

    dy, dx = SENSOR_SIDES[sensor_side]
    roof = np.isin(cls_map, _ROOF_IDS)
    # _shift(roof, dy, dx)[p] tells whether the neighbour of p towards the sensor is roof
    sigma0 = np.where(roof & ~_shift(roof, dy, dx), DOUBLE_BOUNCE_SIGMA0, sigma0)
    behind = np.zeros_like(roof)
    for k in range(1, shadow_length + 1):
        behind |= _shift(roof, k * dy, k * dx)
    sigma0 = np.where(behind & ~roof, SHADOW_SIGMA0, sigma0)

    speckle = rng.gamma(looks, 1.0 / looks, sigma0.shape)
    sar_linear = (sigma0 * speckle).astype(np.float32)
    return to_uint8_db(sar_linear, db_range), sar_linear, sigma0.astype(np.float32)


def to_uint8_db(intensity, db_range=DB_RANGE):
    """
    Map linear SAR intensity to 8 bits: dB, clipped to db_range, scaled to 0..255.

    :param intensity: array of linear intensities (> 0).
    :param db_range: (low, high) dB mapped to 0 and 255.
    :return: uint8 array of the same shape.
    """
    lo, hi = db_range
    intensity = np.asarray(intensity, dtype=np.float64)
    db = 10.0 * np.log10(np.maximum(intensity, 1e-12))
    return np.round(np.clip((db - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)


def _wall_masks(cls_map, sensor_side, shadow_length):
    """
    Where buildings give double bounce and radar shadow (as in simulate_sar).

    :return: (lit, shadow) boolean (H, W) arrays: the roof pixels on the side
        facing the sensor, and the ground behind the buildings.
    """
    dy, dx = SENSOR_SIDES[sensor_side]
    roof = np.isin(cls_map, _ROOF_IDS)
    lit = roof & ~_shift(roof, dy, dx)
    behind = np.zeros_like(roof)
    for k in range(1, shadow_length + 1):
        behind |= _shift(roof, k * dy, k * dx)
    return lit, behind & ~roof


def simulate_cross_pol(
    cls_map, sigma0_vv, rng, looks=4, *, sensor_side=SENSOR_SIDE, shadow_length=1
):
    """
    Simulate the cross-polarised (VH) channel that goes with a VV image.

    The noise-free VH of a pixel is the VH level of its class, moved by the
    same per-region offset as its VV (moisture and crop stage act on both
    channels alike); double bounce and radar shadow get their own VH levels
    (DOUBLE_BOUNCE_SIGMA0_VH, SHADOW_SIGMA0_VH). The speckle of VH is drawn
    independently of that of VV.

    :param cls_map: (H, W) integer class ids (see CLASSES).
    :param sigma0_vv: (H, W) noise-free VV backscatter of the same map, as
        returned by simulate_sar (its per-region offsets are carried over).
    :param rng: numpy Generator for the speckle.
    :param looks: number of looks L of the Gamma(L, 1/L) speckle.
    :param sensor_side: where the radar is, as in simulate_sar.
    :param shadow_length: length of the radar shadow, as in simulate_sar.
    :return: (vh_linear (H, W) float32 speckled intensity, sigma0_vh (H, W)
        float32 noise-free backscatter).
    """
    _check_looks(looks)
    if sensor_side not in SENSOR_SIDES:
        raise ValueError(
            f"sensor_side must be one of {sorted(SENSOR_SIDES)}, got {sensor_side!r}"
        )
    cls_map = np.asarray(cls_map)
    sigma0_vv = np.asarray(sigma0_vv, dtype=np.float64)
    if cls_map.shape != sigma0_vv.shape:
        raise ValueError(
            f"class map {cls_map.shape} and VV backscatter {sigma0_vv.shape} "
            "differ in size"
        )
    if cls_map.max(initial=0) >= len(CLASSES) or cls_map.min(initial=0) < 0:
        raise ValueError(f"class ids must lie in 0..{len(CLASSES) - 1}")
    lit, shadow = _wall_masks(cls_map, sensor_side, shadow_length)
    walls = lit | shadow
    offset = np.where(walls, 1.0, sigma0_vv / _CLASS_SIGMA0[cls_map])
    sigma0_vh = _CLASS_SIGMA0_VH[cls_map] * offset
    sigma0_vh = np.where(lit, DOUBLE_BOUNCE_SIGMA0_VH, sigma0_vh)
    sigma0_vh = np.where(shadow, SHADOW_SIGMA0_VH, sigma0_vh)
    speckle = rng.gamma(looks, 1.0 / looks, sigma0_vh.shape)
    return (sigma0_vh * speckle).astype(np.float32), sigma0_vh.astype(np.float32)


def generate_scene(rng, size, looks=4, *, cross_pol=False, feature_size=None):
    """
    Draw one scene and its radar view.

    :param rng: numpy Generator; the scene is a deterministic function of it.
    :param size: side of the square images in pixels (32 and up gives
        recognisable scenes; larger sizes hold more parcels, not bigger ones).
    :param looks: number of looks of the speckle.
    :param cross_pol: also simulate the VH channel (simulate_cross_pol). Its
        speckle is drawn from rng after everything else, so the other arrays
        are the same with and without it.
    :param feature_size: draw parcels, roads, rivers and houses as large as in a
        scene of this size (and as many as the area holds); None: of ``size``.
    :return: dict with "opt" (H, W, 3) uint8, "sar" (H, W) uint8, "cls"
        (H, W) uint8 class ids, "sar_linear" (H, W) float32 speckled linear
        intensity and "sigma0" (H, W) float32 noise-free backscatter (VV);
        with cross_pol also "vh_linear" and "sigma0_vh", the same for VH.
    """
    if size < MIN_SIZE:
        raise ValueError(f"image size must be at least {MIN_SIZE} pixels, got {size}")
    layout = _layout(rng, size, feature_size)
    regions = np.asarray(layout.image, dtype=np.int64)
    cls_map = np.array(layout.cls, dtype=np.uint8)[regions]
    opt = _render_optical(rng, layout, regions, cls_map)
    shadow_length = max(1, round(layout.feature_size / 96))
    sar, sar_linear, sigma0 = simulate_sar(
        cls_map, rng, looks, regions=regions, shadow_length=shadow_length
    )
    scene = dict(opt=opt, sar=sar, cls=cls_map, sar_linear=sar_linear, sigma0=sigma0)
    if cross_pol:
        scene["vh_linear"], scene["sigma0_vh"] = simulate_cross_pol(
            cls_map, sigma0, rng, looks, shadow_length=shadow_length
        )
    return scene


# ---------------------------------------------------------------------------
# Statistics and datasets


class _ColourStats:
    """Running per-class sums of optical colour, for class means and R^2."""

    def __init__(self):
        self.count = np.zeros(256)
        self.sum = np.zeros((256, 3))
        self.sum_sq = 0.0

    def add(self, opt, cls_map):
        pixels = np.asarray(opt, dtype=np.float64).reshape(-1, 3)
        labels = np.asarray(cls_map).reshape(-1).astype(np.int64)
        if len(labels) != len(pixels):
            raise ValueError(
                f"optical image {np.shape(opt)} and class map "
                f"{np.shape(cls_map)} differ in size"
            )
        self.count += np.bincount(labels, minlength=256)
        for c in range(3):
            self.sum[:, c] += np.bincount(labels, weights=pixels[:, c], minlength=256)
        self.sum_sq += float(np.sum(pixels**2))

    def class_means(self):
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sum / self.count[:, None]

    def explained_share(self):
        total = self.count.sum()
        seen = self.count > 0
        between = np.sum(self.sum[seen] ** 2 / self.count[seen, None])
        global_term = np.sum(self.sum.sum(0) ** 2) / total
        total_ss = self.sum_sq - global_term
        within_ss = self.sum_sq - between
        return 1.0 - within_ss / total_ss


def explained_variance_share(opt_images, cls_maps):
    """
    Share of the optical colour variance that the class map explains.

    R^2 = 1 - sum_p ||opt_p - mean_colour[cls_p]||^2 / sum_p ||opt_p - mean||^2
    over all pixels p of all images, RGB in [0, 255]. 1 means the class alone
    fixes the colour, 0 means it tells nothing.

    :param opt_images: iterable of (H, W, 3) RGB arrays.
    :param cls_maps: iterable of (H, W) class maps, in the same order.
    :return: the share, a float.
    """
    stats = _ColourStats()
    for opt, cls_map in zip(opt_images, cls_maps, strict=True):
        stats.add(opt, cls_map)
    if stats.count.sum() == 0:
        raise ValueError("explained_variance_share needs at least one image")
    return float(stats.explained_share())


def _seed_rng(seed, split_index, index):
    return np.random.default_rng(np.random.SeedSequence([seed, split_index, index]))


def make_dataset(
    out_dir, *, num_train, num_test, image_size, seed, looks=4, progress=True
):
    """
    Write a paired SAR/optical dataset of generated scenes.

    Layout: out_dir/{train,test}/{sar,opt,cls}/NNNNN.png (the same names in
    the three folders) and out_dir/dataset.json. SAR and class maps are mode L
    PNGs, optical images RGB. PNGs already in those six folders are deleted
    first, so a smaller rerun leaves no unpaired leftovers; other files stay.
    Scene i of a split is drawn from SeedSequence([seed, split, i]) (split 0
    for train, 1 for test), so the same seed gives byte-identical files.

    :param out_dir: folder to write to (created if missing).
    :param num_train: number of training pairs (at least 1).
    :param num_test: number of test pairs.
    :param image_size: side of the square images in pixels.
    :param seed: non-negative integer seed.
    :param looks: number of looks of the speckle.
    :param progress: show a progress bar.
    :return: the dict written to dataset.json.
    """
    check_dataset_arguments(num_train, num_test, image_size, seed, looks)
    out_dir = Path(out_dir)
    splits = (("train", num_train), ("test", num_test))
    for split, _ in splits:
        for kind in ("sar", "opt", "cls"):
            folder = out_dir / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.png"):
                stale.unlink()

    stats = _ColourStats()
    sar_moments = np.zeros(3)
    with tqdm(
        total=num_train + num_test, disable=not progress, desc="synthetic scenes"
    ) as bar:
        for split_index, (split, count) in enumerate(splits):
            for i in range(count):
                scene = generate_scene(
                    _seed_rng(seed, split_index, i), image_size, looks
                )
                name = f"{i:05d}.png"
                for kind in ("sar", "opt", "cls"):
                    Image.fromarray(scene[kind]).save(out_dir / split / kind / name)
                if split == "train":
                    stats.add(scene["opt"], scene["cls"])
                    sar = scene["sar"].astype(np.float64)
                    sar_moments += (sar.size, sar.sum(), np.sum(sar**2))
                bar.update()

    means = stats.class_means()
    sar_mean = sar_moments[1] / sar_moments[0]
    info = dict(
        seed=seed,
        image_size=image_size,
        num_train=num_train,
        num_test=num_test,
        looks=looks,
        db_range=list(DB_RANGE),
        sensor_side=SENSOR_SIDE,
        classes=[dict(asdict(c), rgb=list(c.rgb)) for c in CLASSES],
        **class_statistics(stats, means),
        sar_mean=round(float(sar_mean), 3),
        sar_std=round(float(np.sqrt(sar_moments[2] / sar_moments[0] - sar_mean**2)), 3),
    )
    with open(out_dir / "dataset.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info


def class_statistics(stats, means):
    """
    What a data set's info.json says of its classes: each class's share of the
    pixels and mean optical colour, and the share of the optical variance the
    classes explain.

    :param stats: the accumulated class statistics (``count``, ``explained_share``).
    :param means: class id -> mean RGB.
    """
    return dict(
        class_pixel_share=[
            float(stats.count[c.id] / stats.count.sum()) for c in CLASSES
        ],
        class_mean_rgb=[
            [round(float(v), 3) for v in means[c.id]] if stats.count[c.id] else None
            for c in CLASSES
        ],
        explained_variance_share=round(float(stats.explained_share()), 6),
    )
