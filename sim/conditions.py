"""Visual conditions as compositions: scenery x weather/light x camera.

A *condition* is a named triple of values on three axes:

- **scenery** (:class:`Scenery`): where the road runs: surface colours, lane-marking style
  and wear, asphalt patches, verges, and the roadside objects placed along each track from
  its seed (trees, bushes, poles, posts, fences, buildings, parked cars);
- **weather** (:class:`Weather`): sky, sun and ambient light, haze/fog (applied from the
  depth buffer), rain streaks, low light and glare;
- **camera** (:class:`CameraLook`): image formation: exposure, sensor noise, blur, JPEG
  compression artefacts and a small per-episode mounting error.

Every value has a split, ``train`` or ``held_out``; a condition is a *training condition*
when all three of its values are training values, a *new condition* otherwise, so suites
and studies can name both (Codevilla et al., ECCV 2018, report training/new weather
separately). Conditions are named in :data:`CONDITIONS`, or composed inline as
``"scenery.weather.camera"`` (e.g. ``"forest.fog.dashcam"``). Users add their own values
and conditions in a JSON or TOML file (:func:`load_condition_file`).

The first round's four looks keep their pixels: ``flat`` (the first round's ``default``),
``dusk``, ``worn`` and ``desert`` are compositions of the plain scenery values ``meadow``,
``worn`` and ``desert`` with the weather values ``noon``, ``dusk``, ``overcast`` and ``bright``
and the ``ideal`` camera (no effect at all). ``default`` is the ``countryside`` scenery (asphalt
patches, a verge, trees, bushes, poles, posts and signs) at noon through the ideal camera.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from steerloop.errors import SteerloopError, check_keys, parse_json, suggest
from steerloop.sim.camera import Lighting
from steerloop.sim.track.elevation import MAX_BANK_DEG, MAX_GRADE

SPLITS = ("train", "held_out")
SEPARATOR = "."  # inline compositions: "scenery.weather.camera" (a safe file-name character)
MARKING_STYLES = ("dashed", "solid", "double_yellow", "none")  # centre-line styles
EDGE_STYLES = ("both", "right_only", "none")  # which edge lines are painted
OBJECT_KINDS = ("trees", "bushes", "poles", "posts", "fences", "buildings", "parked_cars")
MAX_OBJECT_DENSITY = 20.0  # [objects per 100 m per side] (a fence counts one per 100 m)
MAX_TRAFFIC = 50.0  # [oncoming cars per km]: at most one per 20 m (sim.traffic.MIN_GAP)
TRAFFIC_SPEED_RANGE = (0.0, 30.0)  # [m/s] speed of the oncoming cars
LEAD_GAP_RANGE = (5.0, 100.0)  # [m] bumper-to-bumper gap of a lead car (or 0: none)
# Scenery fields added after condition files were first recorded: a value's recorded fields
# (ConditionFile.values, part of datasets' and runs' identities) name them only when they
# differ from the default, so files that do not use them keep their identities.
LATER_FIELDS = {"scenery": ("traffic", "traffic_speed", "lead_gap", "grade", "bank_deg")}
GRADE_RANGE = (0.0, MAX_GRADE)  # [-] steepest road grade of a scenery (0.10: 10 %)
BANK_RANGE_DEG = (0.0, MAX_BANK_DEG)  # [deg] largest superelevation of a scenery's roads
MAX_CONDITION_FILE_BYTES = 1 << 20  # [bytes]

RGB = tuple[float, float, float]


class ConditionError(SteerloopError):
    """An unknown scenery/weather/camera value or condition, or a malformed condition file."""


@dataclass(frozen=True)
class Scenery:
    """Where the road runs: surfaces, markings and roadside objects."""

    asphalt: RGB = (0.33, 0.33, 0.35)
    """Base asphalt colour (jittered per episode)."""
    ground: RGB = (0.30, 0.52, 0.22)
    """Base ground colour (jittered per episode)."""
    edge: RGB = (0.95, 0.95, 0.95)
    """Edge-line paint colour."""
    centre: RGB = (0.95, 0.95, 0.95)
    """Centre-line paint colour."""
    keep: float = 1.0
    """Fraction of painted line pieces that survive (< 1: worn markings)."""
    centre_style: str = "dashed"
    """Centre line: dashed, solid, double_yellow or none."""
    edge_style: str = "both"
    """Edge lines: both, right_only or none."""
    patches: float = 0.0
    """Asphalt repair patches and tar seams per 100 m of road."""
    patch: RGB = (0.22, 0.22, 0.23)
    """Colour of patches and seams."""
    verge_width: float = 0.0
    """Width of the gravel/dirt verge beyond the asphalt on each side [m] (0: none)."""
    verge: RGB = (0.50, 0.45, 0.38)
    """Verge colour."""
    kerb: bool = False
    """Raised white kerb stones along both road edges."""
    trees: float = 0.0
    """Trees per 100 m per side."""
    bushes: float = 0.0
    """Bushes per 100 m per side."""
    poles: float = 0.0
    """Utility poles per 100 m (left side)."""
    posts: float = 0.0
    """Delineator posts and signs per 100 m per side."""
    fences: float = 0.0
    """Fraction of the route lined by a fence or guard rail on the right (0-1)."""
    buildings: float = 0.0
    """Buildings per 100 m per side."""
    parked_cars: float = 0.0
    """Parked cars on the right shoulder per 100 m."""
    traffic: float = 0.0
    """Oncoming cars in the left lane per km (0 to ``MAX_TRAFFIC``; sim.traffic): moving,
    visual only (no collision)."""
    traffic_speed: float = 12.0
    """Speed of the oncoming cars [m/s] (``TRAFFIC_SPEED_RANGE``)."""
    lead_gap: float = 0.0
    """A lead car in the ego lane this far ahead, bumper to bumper [m] (``LEAD_GAP_RANGE``),
    holding the gap; 0: none. Visual only."""
    grade: float = 0.0
    """Steepest grade of the road [-] (``GRADE_RANGE``; 0.06 = 6 %): hills and dips drawn per
    (track, scenery) (sim.track.elevation); 0: level, as every scenery before elevation."""
    bank_deg: float = 0.0
    """Largest superelevation of the road into its curves [deg] (``BANK_RANGE_DEG``); 0: none."""
    foliage: RGB = (0.16, 0.36, 0.14)
    """Colour of leaves."""
    building: RGB = (0.72, 0.66, 0.58)
    """Colour of walls."""
    split: str = "train"
    """train or held_out."""

    def __post_init__(self):
        for name, value, (low, high) in (("traffic", self.traffic, (0.0, MAX_TRAFFIC)),
                                         ("traffic_speed", self.traffic_speed, TRAFFIC_SPEED_RANGE),
                                         ("grade", self.grade, GRADE_RANGE), ("bank_deg", self.bank_deg, BANK_RANGE_DEG)):
            if not low <= value <= high:
                raise ConditionError(f"Scenery.{name} must be within [{low:g}, {high:g}], got {value!r}")
        if self.lead_gap and not LEAD_GAP_RANGE[0] <= self.lead_gap <= LEAD_GAP_RANGE[1]:
            raise ConditionError(f"Scenery.lead_gap must be 0 (no lead car) or within "
                                 f"[{LEAD_GAP_RANGE[0]:g}, {LEAD_GAP_RANGE[1]:g}] m, got {self.lead_gap!r}")


@dataclass(frozen=True)
class Weather:
    """Sky, light and the atmosphere between the camera and the scene."""

    sky: RGB = (0.55, 0.72, 0.95)
    """Sky colour."""
    light: Lighting = Lighting()
    """The renderer's directional light (sun direction, colour, ambient, diffuse)."""
    surfaces: Mapping[str, RGB] = field(default_factory=dict)
    """Surface colours this light replaces (asphalt, ground, edge, centre), e.g. at dusk."""
    fog: float = 0.0
    """Haze/fog extinction [1/m]: a pixel at distance d keeps exp(-fog d) of its colour."""
    fog_colour: RGB = (0.75, 0.77, 0.80)
    """Colour the fog fades to."""
    rain: int = 0
    """Rain streaks per frame (redrawn every frame)."""
    gain: float = 1.0
    """Scene brightness factor (< 1: low light; the camera's noise grows as 1 / gain)."""
    glare: float = 0.0
    """Peak brightness of a sun glare blob drawn per episode (0-1)."""
    split: str = "train"
    """train or held_out."""


@dataclass(frozen=True)
class CameraLook:
    """Image formation between the lens and the frame."""

    exposure: float = 0.0
    """Per-episode exposure error, uniform in +-exposure stops."""
    noise: float = 0.0
    """Sensor noise standard deviation [8-bit levels] at gain 1."""
    blur: float = 0.0
    """Gaussian blur sigma [px] (defocus, motion)."""
    jpeg: int = 0
    """JPEG quality 1-100 of the frame's compression round trip (0: none)."""
    mount_pitch_deg: float = 0.0
    """Per-episode mounting pitch error, uniform in +-this [deg]."""
    mount_yaw_deg: float = 0.0
    """Per-episode mounting yaw error, uniform in +-this [deg]."""
    mount_height: float = 0.0
    """Per-episode mounting height error, uniform in +-this [m]."""
    split: str = "train"
    """train or held_out."""

    @property
    def is_ideal(self) -> bool:
        return self == dataclasses.replace(CameraLook(), split=self.split)


@dataclass(frozen=True)
class Composition:
    """One condition: a value on each axis."""

    scenery: str
    weather: str
    camera: str = "ideal"


_MEADOW = Scenery()
SCENERY: dict[str, Scenery] = {
    # today's looks (no objects; pixel-identical to before the composition model)
    "meadow": _MEADOW,
    "worn": Scenery(asphalt=(0.38, 0.37, 0.36), ground=(0.36, 0.50, 0.25), edge=(0.70, 0.70, 0.66),
                    centre=(0.70, 0.70, 0.66), keep=0.55, split="held_out"),
    "desert": Scenery(asphalt=(0.25, 0.24, 0.24), ground=(0.80, 0.68, 0.48), edge=(0.95, 0.95, 0.90),
                      centre=(0.95, 0.80, 0.20), split="held_out"),
    # with scenery
    "countryside": Scenery(patches=4.0, verge_width=0.8, verge=(0.48, 0.44, 0.36), trees=2.0, bushes=3.0,
                           poles=1.5, posts=2.0),
    "rural": Scenery(patches=6.0, verge_width=1.2, verge=(0.52, 0.47, 0.38), trees=3.0, bushes=4.0, poles=2.5,
                     posts=2.0, fences=0.4),
    "forest": Scenery(asphalt=(0.30, 0.30, 0.31), ground=(0.22, 0.34, 0.16), patches=4.0, verge_width=0.8,
                      verge=(0.36, 0.30, 0.22), trees=12.0, bushes=6.0, posts=1.0, centre_style="solid",
                      foliage=(0.10, 0.28, 0.10)),
    "suburban": Scenery(asphalt=(0.36, 0.36, 0.37), ground=(0.34, 0.55, 0.26), kerb=True, trees=2.0, bushes=3.0,
                        poles=3.0, buildings=3.0, parked_cars=2.0, fences=0.3, patches=3.0),
    "town": Scenery(asphalt=(0.28, 0.28, 0.29), ground=(0.50, 0.50, 0.48), kerb=True, buildings=8.0, poles=4.0,
                    parked_cars=4.0, posts=2.0, patches=8.0, centre_style="double_yellow",
                    centre=(0.95, 0.78, 0.15), building=(0.62, 0.50, 0.44), split="held_out"),
    "arid": Scenery(asphalt=(0.40, 0.36, 0.33), ground=(0.78, 0.62, 0.42), verge_width=2.0, verge=(0.70, 0.56, 0.40),
                    bushes=5.0, posts=3.0, poles=1.0, keep=0.8, edge_style="right_only", centre_style="none",
                    foliage=(0.45, 0.45, 0.25), patches=2.0, split="held_out"),
}
# with oncoming traffic (sim.traffic): the same kinds and densities of objects as their base
# (placed anew: placement follows the scenery's name), plus moving cars in the other lane
SCENERY["suburban-traffic"] = dataclasses.replace(SCENERY["suburban"], traffic=12.0, traffic_speed=12.0)
SCENERY["town-traffic"] = dataclasses.replace(SCENERY["town"], traffic=20.0, traffic_speed=10.0)
# with elevation (sim.track.elevation): hills and dips, banked curves; objects as their base's (placed anew)
SCENERY["hills"] = dataclasses.replace(SCENERY["rural"], grade=0.06, bank_deg=3.0)
SCENERY["mountain"] = dataclasses.replace(SCENERY["forest"], grade=0.08, bank_deg=5.0, split="held_out")
WEATHER: dict[str, Weather] = {
    "noon": Weather(),
    "dusk": Weather(sky=(0.98, 0.62, 0.45),
                    light=Lighting(direction=(1.0, 0.2, 0.25), color=(1.0, 0.78, 0.62), ambient=0.55, diffuse=0.35),
                    surfaces={"asphalt": (0.30, 0.28, 0.32), "ground": (0.28, 0.36, 0.22),
                              "edge": (0.90, 0.86, 0.78), "centre": (0.90, 0.86, 0.78)}, split="held_out"),
    "overcast": Weather(sky=(0.60, 0.70, 0.85), light=Lighting(ambient=0.65, diffuse=0.4)),
    "bright": Weather(sky=(0.70, 0.82, 0.98), light=Lighting(direction=(0.1, -0.3, 1.0), ambient=0.7, diffuse=0.45)),
    "haze": Weather(sky=(0.70, 0.76, 0.85), fog=0.004, fog_colour=(0.78, 0.80, 0.84)),
    "fog": Weather(sky=(0.72, 0.73, 0.75), light=Lighting(ambient=0.7, diffuse=0.25), fog=0.025,
                   fog_colour=(0.74, 0.75, 0.77), split="held_out"),
    "rain": Weather(sky=(0.50, 0.54, 0.60), light=Lighting(ambient=0.6, diffuse=0.3), fog=0.008,
                    fog_colour=(0.55, 0.58, 0.62), rain=40, surfaces={"asphalt": (0.20, 0.20, 0.22)},
                    split="held_out"),
    "night": Weather(sky=(0.05, 0.06, 0.10), light=Lighting(direction=(0.2, 0.1, 1.0), color=(0.7, 0.75, 0.9),
                                                            ambient=0.35, diffuse=0.25),
                     gain=0.45, fog=0.01, fog_colour=(0.04, 0.05, 0.08), split="held_out"),
    "low_sun": Weather(sky=(0.85, 0.80, 0.70), light=Lighting(direction=(1.0, 0.1, 0.15), color=(1.0, 0.9, 0.75),
                                                              ambient=0.55, diffuse=0.5), glare=0.6),
}
CAMERAS: dict[str, CameraLook] = {
    "ideal": CameraLook(),
    "dashcam": CameraLook(exposure=0.3, noise=3.0, blur=0.6, jpeg=70, mount_pitch_deg=1.0, mount_yaw_deg=1.0,
                          mount_height=0.05),
    "cheap": CameraLook(exposure=0.6, noise=7.0, blur=1.0, jpeg=35, mount_pitch_deg=2.0, mount_yaw_deg=2.0,
                        mount_height=0.1, split="held_out"),
}
CONDITIONS: dict[str, Composition] = {
    "default": Composition("countryside", "noon"),
    "flat": Composition("meadow", "noon"),
    "dusk": Composition("meadow", "dusk"),
    "worn": Composition("worn", "overcast"),
    "desert": Composition("desert", "bright"),
    "rural": Composition("rural", "noon", "dashcam"),
    "forest": Composition("forest", "overcast", "dashcam"),
    "suburban": Composition("suburban", "haze", "dashcam"),
    "suburban-traffic": Composition("suburban-traffic", "haze", "dashcam"),
    "town-rain": Composition("town", "rain", "dashcam"),
    "forest-fog": Composition("forest", "fog", "dashcam"),
    "rural-night": Composition("rural", "night", "cheap"),
    "arid-glare": Composition("arid", "low_sun", "cheap"),
    "town-traffic": Composition("town-traffic", "overcast", "dashcam"),  # held out, with oncoming cars
    "rural-hills": Composition("hills", "noon", "dashcam"),
    "mountain-fog": Composition("mountain", "fog", "dashcam"),
}
RICHEST = "town-rain"  # the level built-in condition with the most geometry and effects (bench env)
TRAFFIC = "town-traffic.rain.dashcam"  # RICHEST with oncoming cars (bench env: their cost side by side)
GRADED = "mountain-fog"  # the graded built-in condition with the most geometry and effects: the costliest (bench env)
AXES = {"scenery": SCENERY, "weather": WEATHER, "camera": CAMERAS}
AXIS_TYPES = {"scenery": Scenery, "weather": Weather, "camera": CameraLook}


@dataclass(frozen=True)
class ConditionSet:
    """The values of each axis and the named conditions (built-in, plus a user's file)."""

    scenery: Mapping[str, Scenery]
    weather: Mapping[str, Weather]
    camera: Mapping[str, CameraLook]
    named: Mapping[str, Composition]
    source: str = ""
    """Where the user's values come from (``condition file PATH``), or "" for the built-ins alone."""

    def axis(self, name: str) -> Mapping[str, Any]:
        return {"scenery": self.scenery, "weather": self.weather, "camera": self.camera}[name]

    def resolve(self, name: str, where: str = "condition") -> Composition:
        """The composition called ``name`` (named or ``scenery.weather.camera``), or ConditionError."""
        if not isinstance(name, str):
            raise ConditionError(f"{where}: must be a condition name (a string), got {name!r}")
        if name in self.named:
            return self.named[name]
        parts = name.split(SEPARATOR)
        if len(parts) in (2, 3):
            composition = Composition(*parts)
            self.check(composition, f"{where} {name!r}")
            return composition
        origin = f" (built in or from {self.source})" if self.source else ""
        raise ConditionError(f"{where}: unknown condition {name!r}{suggest(name, self.named)}; choose from "
                             f"{sorted(self.named)}{origin} or compose one as "
                             f"scenery{SEPARATOR}weather{SEPARATOR}camera")

    def check(self, composition: Composition, where: str) -> None:
        for axis in AXES:
            value = getattr(composition, axis)
            values = self.axis(axis)
            if value not in values:
                origin = f" (built in or from {self.source})" if self.source else ""
                raise ConditionError(f"{where}: unknown {axis} {value!r}{suggest(value, values)}; valid {axis} "
                                     f"values are {sorted(values)}{origin}")

    def split(self, name: str) -> str:
        """``train`` when every value of the condition is a training value, else ``held_out``."""
        composition = self.resolve(name)
        held = any(getattr(self.axis(axis)[getattr(composition, axis)], "split") == "held_out" for axis in AXES)
        return "held_out" if held else "train"

    def names(self, split: str | None = None) -> tuple[str, ...]:
        """The named conditions (of ``split``, if given), sorted."""
        return tuple(n for n in sorted(self.named) if split is None or self.split(n) == split)


BUILTIN = ConditionSet(dict(SCENERY), dict(WEATHER), dict(CAMERAS), dict(CONDITIONS))  # plain dicts: picklable


def resolve(name: str, conditions: ConditionSet = BUILTIN, where: str = "condition") -> Composition:
    """The composition of the condition ``name``; ConditionError names it and the valid values."""
    return conditions.resolve(name, where)


def check_conditions(names, source: "ConditionFile | None" = None) -> None:
    """Every name of a config's ``conditions`` list resolves (built in, inline
    ``scenery.weather.camera``, or from the condition file ``source``); the list is not empty."""
    if not names:
        raise ValueError("conditions: give at least one visual condition")
    available = source.conditions if source is not None else BUILTIN
    for index, condition in enumerate(names):
        available.resolve(condition, where=f"conditions[{index}]")


def training_conditions(conditions: ConditionSet = BUILTIN) -> tuple[str, ...]:
    return conditions.names("train")


def held_out_conditions(conditions: ConditionSet = BUILTIN) -> tuple[str, ...]:
    return conditions.names("held_out")


# ------------------------------------------------------------------ user files
FILE_SECTIONS = ("scenery", "weather", "camera", "conditions")
CONDITION_KEYS = ("scenery", "weather", "camera")


def _colour(value, where: str) -> RGB:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in value)):
        raise ConditionError(f"{where}: must be an [r, g, b] colour with channels in [0, 1], got {value!r}")
    return tuple(float(v) for v in value)


def _field_value(cls: type, f: dataclasses.Field, value, where: str):
    """``value`` converted to the type of field ``f``, or ConditionError naming ``where``."""
    default = getattr(cls(), f.name)
    if f.name == "split":
        if value not in SPLITS:
            raise ConditionError(f"{where}: must be one of {list(SPLITS)}, got {value!r}")
        return value
    styles = {"centre_style": MARKING_STYLES, "edge_style": EDGE_STYLES}.get(f.name)
    if styles is not None:
        if value not in styles:
            raise ConditionError(f"{where}: must be one of {list(styles)}, got {value!r}{suggest(value, styles)}")
        return value
    if isinstance(default, tuple):
        return _colour(value, where)
    if isinstance(default, Lighting):
        if not isinstance(value, dict):
            raise ConditionError(f"{where}: must be a table of {[g.name for g in dataclasses.fields(Lighting)]}")
        check_keys(value, [g.name for g in dataclasses.fields(Lighting)], where, ConditionError)
        out = {}
        for key, item in value.items():
            out[key] = _colour(item, f"{where}.{key}") if key in ("direction", "color") else \
                _number(item, f"{where}.{key}", 0.0, 2.0)
        return Lighting(**out)
    if isinstance(default, Mapping):
        if not isinstance(value, dict):
            raise ConditionError(f"{where}: must be a table of surface colours")
        check_keys(value, ("asphalt", "ground", "edge", "centre"), where, ConditionError)
        return {key: _colour(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConditionError(f"{where}: must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
            raise ConditionError(f"{where}: must be an integer in [0, 100], got {value!r}")
        return value
    if f.name == "traffic":
        return _number(value, f"{where} [oncoming cars per km]", 0.0, MAX_TRAFFIC)
    if f.name == "traffic_speed":
        return _number(value, f"{where} [m/s]", *TRAFFIC_SPEED_RANGE)
    if f.name == "grade":
        return _number(value, f"{where} [fraction, 0.06 = 6 %]", *GRADE_RANGE)
    if f.name == "bank_deg":
        return _number(value, f"{where} [deg]", *BANK_RANGE_DEG)
    if f.name == "lead_gap":
        number = _number(value, f"{where} [m]", 0.0, LEAD_GAP_RANGE[1])
        if 0.0 < number < LEAD_GAP_RANGE[0]:
            raise ConditionError(f"{where}: must be 0 (no lead car) or a gap in [{LEAD_GAP_RANGE[0]:g}, "
                                 f"{LEAD_GAP_RANGE[1]:g}] m, got {value!r}")
        return number
    return _number(value, where, 0.0, MAX_OBJECT_DENSITY if f.name in OBJECT_KINDS or f.name == "patches" else 10.0)


def _number(value, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConditionError(f"{where}: must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _parse_value(axis: str, name: str, spec, base_values: Mapping[str, Any], where: str):
    cls = AXIS_TYPES[axis]
    if not isinstance(spec, dict):
        raise ConditionError(f"{where}: must be a table of fields")
    names = [f.name for f in dataclasses.fields(cls)]
    check_keys(spec, ["base", *names], where, ConditionError)
    base = spec.get("base")
    if base is not None and base not in base_values:
        raise ConditionError(f"{where}.base: unknown {axis} {base!r}{suggest(base, base_values)}; valid {axis} "
                             f"values are {sorted(base_values)}")
    start = base_values[base] if base is not None else cls()
    changes = {f.name: _field_value(cls, f, spec[f.name], f"{where}.{f.name}")
               for f in dataclasses.fields(cls) if f.name in spec}
    return dataclasses.replace(start, **changes)


@dataclass(frozen=True)
class ConditionFile:
    """A user's condition file as read once: plain data that crosses to worker processes and
    Ray tasks, which rebuild the :class:`ConditionSet` from ``content`` (nothing from a file
    is pickled to disk or executed, and a worker never reads the file again)."""

    path: str
    """The file as named (for messages)."""
    content: Mapping[str, Any]
    """Its parsed JSON/TOML: sections ``scenery``, ``weather``, ``camera``, ``conditions``."""
    sha256: str
    """SHA-256 of the file's bytes (recorded in manifests; a resume with other content is refused)."""

    @property
    def conditions(self) -> ConditionSet:
        return conditions_from_content(self.content, f"condition file {self.path}")

    def values(self, names) -> dict[str, dict]:
        """What the conditions ``names`` are made of under this file: each one's composition and
        the fields of its scenery, weather and camera values (JSON-ready; stored in manifests)."""
        return condition_values(names, self.conditions)

    def identity(self, names) -> dict:
        """The file's part of a recording's or run's identity: content hash and the values used."""
        return {"sha256": self.sha256, "values": self.values(names)}

    def to_dict(self) -> dict:
        """Hash and content (no path: moving the file keeps the identity); :meth:`from_dict` reads it back."""
        return {"sha256": self.sha256, "content": _plain(self.content)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "<run.json>") -> ConditionFile:
        return cls(path=path, content=data["content"], sha256=data["sha256"])


def condition_values(names, conditions: ConditionSet = BUILTIN) -> dict[str, dict]:
    """What the conditions ``names`` are made of: each one's composition and the fields of its
    scenery, weather and camera values (JSON-ready)."""
    out = {}
    for name in names:
        composition = conditions.resolve(name)
        out[name] = {axis: {"name": getattr(composition, axis),
                            **_recorded_fields(axis, conditions.axis(axis)[getattr(composition, axis)])}
                     for axis in AXES}
    return out


def world_digest(names, conditions: ConditionSet = BUILTIN) -> str:
    """A short hash of what the conditions ``names`` are made of (:func:`condition_values`).

    Part of every recording's, run's and study stage's identity, so a cache or a resume never
    mixes frames of a condition whose values changed (e.g. ``default`` gaining scenery) with
    frames of its old look."""
    text = json.dumps(condition_values(sorted(set(names)), conditions), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_from_values(values: Mapping[str, Any]) -> dict:
    """Condition-file content that defines the conditions described by ``values`` (as
    :meth:`ConditionFile.values` stores them in a manifest): the values and names that are
    not built in. Restarting from a log recorded under a user's file needs no file."""
    content: dict = {section: {} for section in FILE_SECTIONS}
    for name, parts in values.items():
        for axis in AXES:
            value = parts[axis]["name"]
            if value not in BUILTIN.axis(axis):
                content[axis][value] = {key: v for key, v in parts[axis].items() if key != "name"}
        if name not in BUILTIN.named and len(name.split(SEPARATOR)) not in (2, 3):
            content["conditions"][name] = {axis: parts[axis]["name"] for axis in AXES}
    return content


def _recorded_fields(axis: str, value) -> dict:
    """The fields of one axis value as recorded in manifests: all of them, except the
    ``LATER_FIELDS`` that hold their default (see there)."""
    default = AXIS_TYPES[axis]()
    later = LATER_FIELDS.get(axis, ())
    return {key: item for key, item in _plain(dataclasses.asdict(value)).items()
            if key not in later or getattr(value, key) != getattr(default, key)}


def _plain(value):
    """``value`` with tuples as lists and mappings as dicts (JSON's shape)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_condition_file(path: str | Path) -> ConditionFile:
    """A user's condition file (JSON or TOML, by extension), read once and checked.

    Sections ``[scenery.NAME]``, ``[weather.NAME]``, ``[camera.NAME]`` define values (fields of
    :class:`Scenery`, :class:`Weather`, :class:`CameraLook`, optionally starting from
    ``base = "an existing value"``); ``[conditions.NAME]`` names compositions with
    ``scenery``, ``weather`` and ``camera`` (default ``ideal``). Every error names the file
    and the field, and lists the valid values.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConditionError(f"condition_file: must be the path of a JSON or TOML condition file, got {path!r}")
    path = Path(path)
    where = f"condition file {path}"
    if path.suffix not in (".json", ".toml"):
        raise ConditionError(f"{where}: must end in .json or .toml")
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise ConditionError(f"{where} {state}; give the path of a JSON or TOML file")
    if path.stat().st_size > MAX_CONDITION_FILE_BYTES:
        raise ConditionError(f"{where} is larger than {MAX_CONDITION_FILE_BYTES} bytes")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConditionError(f"{where} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix == ".toml":
        try:
            content = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConditionError(f"{where}: not valid TOML ({error})") from None
    else:
        content = parse_json(text, where, ConditionError)
    conditions_from_content(content, where)  # every error now, naming the file
    return ConditionFile(str(path), content, hashlib.sha256(data).hexdigest())


def load_condition_file(path: str | Path) -> ConditionSet:
    """The built-in conditions plus a user's file (see :func:`read_condition_file`)."""
    return read_condition_file(path).conditions


def conditions_from_content(spec: Any, where: str = "condition_file") -> ConditionSet:
    """The built-in conditions plus those of a condition file's parsed content ``spec``;
    errors begin with ``where`` (the file, or the field that gave the content)."""
    if not isinstance(spec, Mapping):
        raise ConditionError(f"{where}: must be an object/table with sections {list(FILE_SECTIONS)}")
    check_keys(spec, FILE_SECTIONS, where, ConditionError)
    axes = {axis: dict(BUILTIN.axis(axis)) for axis in AXES}
    for axis in AXES:
        section = spec.get(axis, {})
        if not isinstance(section, Mapping):
            raise ConditionError(f"{where}: [{axis}] must be a table of named values")
        for name, value in section.items():
            _check_name(name, f"{where}: {axis}.{name}")
            axes[axis][name] = _parse_value(axis, name, value, axes[axis], f"{where}: {axis}.{name}")
    named = dict(BUILTIN.named)
    conditions = ConditionSet(axes["scenery"], axes["weather"], axes["camera"], named)
    section = spec.get("conditions", {})
    if not isinstance(section, Mapping):
        raise ConditionError(f"{where}: [conditions] must be a table of named compositions")
    for name, value in section.items():
        entry = f"{where}: conditions.{name}"
        _check_name(name, entry)
        if not isinstance(value, Mapping):
            raise ConditionError(f"{entry}: must be a table with keys {list(CONDITION_KEYS)}")
        check_keys(value, CONDITION_KEYS, entry, ConditionError)
        missing = [key for key in ("scenery", "weather") if key not in value]
        if missing:
            raise ConditionError(f"{entry}: missing {missing}")
        if not all(isinstance(item, str) for item in value.values()):
            raise ConditionError(f"{entry}: scenery, weather and camera must be value names (strings)")
        composition = Composition(**value)
        conditions.check(composition, entry)
        named[name] = composition
    return ConditionSet(axes["scenery"], axes["weather"], axes["camera"], named, source=where)


def _check_name(name: str, where: str) -> None:
    from steerloop.paths import NAME_RE

    if SEPARATOR in name or not NAME_RE.fullmatch(name):
        raise ConditionError(f"{where}: names may use A-Z a-z 0-9 _ - (no '{SEPARATOR}'), starting with a letter or "
                             "digit")
