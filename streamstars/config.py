"""The one typed configuration object, with fgcmcal's defaults and fgcmcal's field names.

A TOML file given with ``--config`` uses fgcmcal's own names as top-level keys
(``primaryBands``, ``matchRadius``, ...), a ``[sourceSelector]`` table for the source cuts
(with sub-tables ``flags``, ``unresolved``, ``signalToNoise``, ``isolated``,
``requireFiniteRaDec``, ``requirePrimary`` as in fgcmcal's ``science`` source selector) and a
``[fgcmLoadReferenceCatalog]`` table for reference matching.  Unknown keys are an error naming
the key.  ``streamstars config show`` prints the effective configuration as TOML.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bands import band_name_problem
from .errors import ConfigError

DEFAULT_BAD_FLAGS: tuple[str, ...] = (
    "pixelFlags_edge",
    "pixelFlags_interpolatedCenter",
    "pixelFlags_saturatedCenter",
    "pixelFlags_crCenter",
    "pixelFlags_bad",
    "pixelFlags_interpolated",
    "pixelFlags_saturated",
    "centroid_flag",
    "apFlux_12_0_flag",
)


@dataclass(frozen=True)
class FlagsConfig:
    """Sources with any of these boolean columns True are rejected."""

    bad: tuple[str, ...] = DEFAULT_BAD_FLAGS


@dataclass(frozen=True)
class UnresolvedConfig:
    """Star/galaxy cut: keep ``name < maximum`` (NaN fails)."""

    name: str = "extendedness"
    maximum: float = 0.5


@dataclass(frozen=True)
class SignalToNoiseConfig:
    """Keep ``minimum < fluxField / errField < maximum`` (finite only)."""

    fluxField: str = "apFlux_12_0_instFlux"
    errField: str = "apFlux_12_0_instFluxErr"
    minimum: float = 10.0
    maximum: float = 1000.0


@dataclass(frozen=True)
class IsolatedConfig:
    """Never-deblended cut: ``parentName == 0`` and ``nChildName == 0``."""

    parentName: str = "parentSourceId"
    nChildName: str = "deblend_nChild"


@dataclass(frozen=True)
class RequireFiniteRaDecConfig:
    """Coordinates (degrees) must be finite."""

    raColName: str = "ra"
    decColName: str = "dec"


@dataclass(frozen=True)
class RequirePrimaryConfig:
    """``primaryColName`` must be True (skipped when the column is absent, as for HSC)."""

    primaryColName: str = "detect_isPrimary"


@dataclass(frozen=True)
class SourceSelectorConfig:
    """fgcmcal's ``sourceSelector['science']`` with every cut switchable."""

    doFlags: bool = True
    doUnresolved: bool = True
    doSignalToNoise: bool = True
    doIsolated: bool = True
    doRequireFiniteRaDec: bool = True
    doRequirePrimary: bool = True
    flags: FlagsConfig = field(default_factory=FlagsConfig)
    unresolved: UnresolvedConfig = field(default_factory=UnresolvedConfig)
    signalToNoise: SignalToNoiseConfig = field(default_factory=SignalToNoiseConfig)
    isolated: IsolatedConfig = field(default_factory=IsolatedConfig)
    requireFiniteRaDec: RequireFiniteRaDecConfig = field(default_factory=RequireFiniteRaDecConfig)
    requirePrimary: RequirePrimaryConfig = field(default_factory=RequirePrimaryConfig)


@dataclass(frozen=True)
class ReferenceSignalToNoiseConfig:
    """Reference selector S/N cut on one reference flux column (nJy)."""

    fluxField: str = "i_flux"
    errField: str = "i_fluxErr"
    minimum: float = 10.0


@dataclass(frozen=True)
class ReferenceFlagsConfig:
    """Reference selector flags: ``good`` must be set, ``bad`` must not."""

    good: tuple[str, ...] = ()
    bad: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReferenceSelectorConfig:
    """fgcmcal's ``referenceSelector``."""

    doSignalToNoise: bool = False
    doFlags: bool = False
    signalToNoise: ReferenceSignalToNoiseConfig = field(
        default_factory=ReferenceSignalToNoiseConfig
    )
    flags: ReferenceFlagsConfig = field(default_factory=ReferenceFlagsConfig)


@dataclass(frozen=True)
class ColortermConfig:
    """``m = primary + c0 + c1 (primary - secondary) + c2 (primary - secondary)^2``."""

    primary: str = ""
    secondary: str = ""
    c0: float = 0.0
    c1: float = 0.0
    c2: float = 0.0


@dataclass(frozen=True)
class RefcatLoadConfig:
    """fgcmcal's ``fgcmLoadReferenceCatalog`` (the ``[fgcmLoadReferenceCatalog]`` table).

    ``path`` is an LSST HTM-indexed reference catalog directory; empty means no reference
    matching.  ``filterMap`` maps a physical filter to the refcat filter whose ``<f>_flux`` is
    used.  ``colorterms`` maps a physical filter to its colour term.

    The catalog may instead come from a Butler repository (``streamstars[butler]``,
    docs/butler.md): ``collections`` names the collections holding its ``datasetType``
    datasets (one per ``htm<depth>`` shard, storage class ``SimpleCatalog``, as fgcmcal's
    ``cal_ref_cat`` prerequisite input), in the repository ``repo`` -- empty: the command's
    ``--butler`` repository.  ``path`` and ``collections`` exclude each other.
    """

    path: str = ""
    collections: tuple[str, ...] = ()
    datasetType: str = "cal_ref_cat"
    repo: str = ""
    filterMap: dict[str, str] = field(default_factory=dict)
    applyColorTerms: bool = False
    colorterms: dict[str, ColortermConfig] = field(default_factory=dict)
    referenceSelector: ReferenceSelectorConfig = field(default_factory=ReferenceSelectorConfig)
    matchRadius: float = 1.0


@dataclass(frozen=True)
class BuildStarsConfig:
    """Everything streamstars needs, with fgcmcal's ``FgcmBuildStarsTableConfig`` defaults.

    Radii are in arcseconds.  ``storeNside`` (streamstars' own) is the HEALPix nest resolution
    keying the observation and component records in the LMDB store.  ``shardNside`` and
    ``shardMargin`` (streamstars' own) cut the state into sky shards: HEALPix nest pixels at
    ``shardNside``, each storing the observations inside it and within ``shardMargin`` arcsec
    outside it (docs/state.md).  ``shardMargin`` left out is derived from the radii when the
    configuration is built (:func:`derived_shard_margin`), so the built object (and
    ``config show``, and the state's record of it) always holds the number.
    """

    primaryBands: tuple[str, ...] = ("i", "r", "g", "z")
    requiredBands: tuple[str, ...] = ()
    minPerBand: int = 2
    matchRadius: float = 1.0
    isolationRadius: float = 2.0
    coarseNside: int = 8
    densityCutNside: int = 128
    densityCutMaxPerPixel: int = 1000
    randomSeed: int = 123456
    reserveFraction: float = 0.1
    physicalFilterMap: dict[str, str] = field(default_factory=dict)
    instFluxField: str = "apFlux_12_0_instFlux"
    apertureInnerInstFluxField: str = "apFlux_12_0_instFlux"
    apertureOuterInstFluxField: str = "apFlux_17_0_instFlux"
    doSubtractLocalBackground: bool = False
    localBackgroundFluxField: str = "localBackground_instFlux"
    doApplyWcsJacobian: bool = True
    referenceCCD: int = 40
    psfCandidateName: str = "calib_psf_candidate"
    storeNside: int = 256
    shardNside: int = 32
    #: [arcsec]; NaN (the default, or absent from a file) means derived from the association
    #: radii when the configuration is built (:func:`derived_shard_margin`)
    shardMargin: float = math.nan
    sourceSelector: SourceSelectorConfig = field(default_factory=SourceSelectorConfig)
    fgcmLoadReferenceCatalog: RefcatLoadConfig = field(default_factory=RefcatLoadConfig)

    def __post_init__(self) -> None:
        _check_band_names(self)
        if not self.primaryBands:
            raise ConfigError("primaryBands must name at least one band")
        if isinstance(self.shardMargin, float) and math.isnan(self.shardMargin):
            # frozen: the derived default is resolved once, here
            object.__setattr__(self, "shardMargin", derived_shard_margin(self))
        validate(self)

    # --- derived values -------------------------------------------------------------------
    def band_of(self, physical_filter: str, recorded_band: str) -> str:
        """The band of a visit: ``physicalFilterMap`` first, else the band recorded with it."""
        return self.physicalFilterMap.get(physical_filter, recorded_band)

    def association_fingerprint(self) -> dict[str, Any]:
        """The settings that shape what is *stored*; a store refuses to reopen if they differ.

        Snapshot-time settings (isolation, requiredBands, density cut, seeds) may change freely.
        ``referenceCCD`` shapes the stored jacobian and visit metadata; ``shardNside`` and
        ``shardMargin`` decide which shard stores which observation.
        """
        data = to_dict(self)
        for key in (
            "requiredBands",
            "isolationRadius",
            "densityCutNside",
            "densityCutMaxPerPixel",
            "randomSeed",
            "reserveFraction",
            "fgcmLoadReferenceCatalog",
        ):
            data.pop(key)
        return data

    def to_toml(self) -> str:
        """The configuration as TOML, loadable with :func:`load_config`."""
        return _to_toml(to_dict(self))


# --- allowed values ---------------------------------------------------------------------------
#: healpy's largest nside (2**29).
HEALPIX_MAX_NSIDE = 1 << 29
#: The store sorts observations by their pixel at ``storeNside * STORE_FINE_FACTOR``
#: (streamstars.state.schema.FINE_FACTOR), which must stay a valid nside.
STORE_FINE_FACTOR = 64
#: A store pixel must be at least this many times ``matchRadius +
#: fgcmLoadReferenceCatalog.matchRadius`` wide: association and reference caching look at a
#: pixel and its 8 neighbours only, so everything within reach of a point (the match radius
#: plus the extent of a friends-of-friends component, plus the reference match radius) must
#: lie within one pixel of it.
STORE_PIXEL_REACH_FACTOR = 10.0
#: The largest radius (arcsec) any match or isolation setting may take: far beyond any
#: star-association use (fgcmcal: 1" and 2"), small enough that a radius can never cover a
#: large part of a pixel or of the sky.
MAX_MATCH_RADIUS_ARCSEC = 60.0
MAX_ISOLATION_RADIUS_ARCSEC = 600.0
_INT32_MAX = (1 << 31) - 1
#: A component's fixed-point vector sums hold at most 2**23 observations (streamstars.sky).
MAX_OBSERVATIONS_PER_STAR = 1 << 23
_ARCSEC_PER_RADIAN = 180.0 * 3600.0 / math.pi


@dataclass(frozen=True)
class Allowed:
    """The allowed values of one numeric configuration key.

    ``kind`` is ``int`` (an integer, booleans excluded) or ``float`` (any finite number);
    the value must lie between ``low`` and ``high`` (excluded when ``low_open`` /
    ``high_open``); ``power_of_two`` asks for a power of two (HEALPix nside).
    """

    kind: type
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    power_of_two: bool = False
    unit: str = ""

    def describe(self) -> str:
        """The allowed values in words, e.g. ``a number in (0, 60] arcsec``."""
        unit = f" {self.unit}" if self.unit else ""
        if self.power_of_two:
            return (f"a power of two from {_number(self.low)} to {_number(self.high)} "
                    f"(2**{int(self.high).bit_length() - 1})")
        what = "an integer" if self.kind is int else "a finite number"
        if math.isinf(self.low) and math.isinf(self.high):
            return what + unit
        if math.isinf(self.high):
            return f"{what} {'>' if self.low_open else '>='} {_number(self.low)}{unit}"
        return (f"{what} in {'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}{unit}")

    def allows(self, value: object) -> bool:
        """Whether ``value`` is allowed."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if value < self.low or (self.low_open and value == self.low):
            return False
        if value > self.high or (self.high_open and value == self.high):
            return False
        return not self.power_of_two or (int(value) & (int(value) - 1)) == 0


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


_ARCSEC_RADIUS = Allowed(float, 0.0, MAX_MATCH_RADIUS_ARCSEC, low_open=True, unit="arcsec")
_FINITE = Allowed(float)
_NON_NEGATIVE = Allowed(float, 0.0)

#: The allowed values of every numeric configuration key (dotted path; ``*`` stands for any
#: key of a table such as ``colorterms``).  Every int or float field of the configuration has
#: an entry (a missing one is a programming error, caught by the tests); cross-key rules are
#: in :func:`validate`.
ALLOWED: dict[str, Allowed] = {
    "minPerBand": Allowed(int, 1, MAX_OBSERVATIONS_PER_STAR),
    "matchRadius": _ARCSEC_RADIUS,
    "isolationRadius": Allowed(float, 0.0, MAX_ISOLATION_RADIUS_ARCSEC, low_open=True,
                               unit="arcsec"),
    "coarseNside": Allowed(int, 1, HEALPIX_MAX_NSIDE, power_of_two=True),
    "densityCutNside": Allowed(int, 1, HEALPIX_MAX_NSIDE, power_of_two=True),
    "densityCutMaxPerPixel": Allowed(int, 1, _INT32_MAX),
    # fgcm seeds numpy's legacy generator with it, which takes [0, 2**32 - 1]
    "randomSeed": Allowed(int, 0, (1 << 32) - 1),
    # 1 would reserve every star and leave none to fit
    "reserveFraction": Allowed(float, 0.0, 1.0, high_open=True),
    "referenceCCD": Allowed(int, 0, _INT32_MAX),
    "storeNside": Allowed(int, 1, HEALPIX_MAX_NSIDE // STORE_FINE_FACTOR, power_of_two=True),
    # the upper bounds are cross-key rules (validate): <= densityCutNside, < a quarter shard
    "shardNside": Allowed(int, 1, HEALPIX_MAX_NSIDE, power_of_two=True),
    "shardMargin": Allowed(float, 0.0, low_open=True, unit="arcsec"),
    "sourceSelector.unresolved.maximum": _FINITE,
    "sourceSelector.signalToNoise.minimum": _NON_NEGATIVE,
    "sourceSelector.signalToNoise.maximum": Allowed(float, 0.0, low_open=True),
    "fgcmLoadReferenceCatalog.matchRadius": _ARCSEC_RADIUS,
    "fgcmLoadReferenceCatalog.referenceSelector.signalToNoise.minimum": _NON_NEGATIVE,
    "fgcmLoadReferenceCatalog.colorterms.*.c0": _FINITE,
    "fgcmLoadReferenceCatalog.colorterms.*.c1": _FINITE,
    "fgcmLoadReferenceCatalog.colorterms.*.c2": _FINITE,
}


def numeric_fields(obj: Any, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted key, ALLOWED pattern, value) of every int/float field of a config dataclass,
    nested tables included (``colorterms`` entries appear once per filter)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if hint is int or hint is float:
            yield key, key, value
        elif dataclasses.is_dataclass(value):
            yield from numeric_fields(value, key + ".")
        elif typing.get_origin(hint) is dict and \
                dataclasses.is_dataclass(typing.get_args(hint)[1]):
            for name, item in value.items():
                for sub_key, pattern, sub_value in numeric_fields(item, ""):
                    yield f"{key}.{name}.{sub_key}", f"{key}.*.{pattern}", sub_value


def store_pixel_arcsec(nside: int) -> float:
    """The HEALPix pixel size (square root of its area, arcsec) at ``nside``."""
    return math.sqrt(math.pi / 3.0) / nside * _ARCSEC_PER_RADIAN


def decision_reach(config: BuildStarsConfig) -> float:
    """How far [arcsec] the decision about a star reaches (docs/state.md, "Shards"):
    ``D = isolationRadius + (len(primaryBands) + 1) x matchRadius`` -- the isolation radius,
    the cross-band merge chain of up to one ``matchRadius`` per primary band, and membership."""
    return config.isolationRadius + (len(config.primaryBands) + 1) * config.matchRadius


def derived_shard_margin(config: BuildStarsConfig) -> float:
    """The default ``shardMargin`` [arcsec]: :func:`decision_reach` plus one ``matchRadius``
    for the completeness test and one for the extent of the components there
    (``isolationRadius + (len(primaryBands) + 3) x matchRadius``, 9 with fgcmcal's
    defaults)."""
    return decision_reach(config) + 2 * config.matchRadius


def validate(config: BuildStarsConfig) -> None:
    """Check every numeric key against :data:`ALLOWED` and the rules between keys.

    Called whenever a :class:`BuildStarsConfig` is built (loaded, replaced or read back from a
    store).

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    for key, pattern, value in numeric_fields(config):
        allowed = ALLOWED.get(pattern)
        if allowed is None:  # every numeric key needs a range: a programming error
            raise TypeError(f"configuration key {key} has no entry in ALLOWED")
        if not allowed.allows(value):
            raise ConfigError(f"{key} must be {allowed.describe()}, got {value!r}")
    if config.isolationRadius < 2 * config.matchRadius:
        raise ConfigError(
            f"isolationRadius ({config.isolationRadius}) must be at least 2 x matchRadius "
            f"({config.matchRadius}) so that every observation belongs to at most one star")
    selector = config.sourceSelector.signalToNoise
    if not selector.minimum < selector.maximum:
        raise ConfigError(
            f"sourceSelector.signalToNoise.minimum ({selector.minimum}) must be smaller than "
            f"sourceSelector.signalToNoise.maximum ({selector.maximum})")
    reach = STORE_PIXEL_REACH_FACTOR * (config.matchRadius
                                        + config.fgcmLoadReferenceCatalog.matchRadius)
    if store_pixel_arcsec(config.storeNside) < reach:
        largest = 1
        while store_pixel_arcsec(largest * 2) >= reach:
            largest *= 2
        raise ConfigError(
            f"storeNside = {config.storeNside} has pixels of "
            f"{store_pixel_arcsec(config.storeNside):.3g} arcsec; they must be at least "
            f"{STORE_PIXEL_REACH_FACTOR:g} x (matchRadius + "
            f"fgcmLoadReferenceCatalog.matchRadius) = {reach:g} arcsec wide: use storeNside "
            f"<= {largest} (or smaller radii)")
    _validate_shards(config)


def _validate_shards(config: BuildStarsConfig) -> None:
    """The rules between ``shardNside``, ``shardMargin`` and the other keys.

    Raises:
        ConfigError: naming the key, the value and the bound.
    """
    if config.shardNside > config.densityCutNside:
        raise ConfigError(
            f"shardNside ({config.shardNside}) must be at most densityCutNside "
            f"({config.densityCutNside}): the density cut's pixels must nest inside shards")
    needed = decision_reach(config) + config.matchRadius
    if config.shardMargin < needed:
        raise ConfigError(
            f"shardMargin ({config.shardMargin:g} arcsec) must be at least isolationRadius + "
            f"(len(primaryBands) + 2) x matchRadius = {needed:g} arcsec: a shard must hold "
            "everything that decides the stars of its core (leave shardMargin out to derive "
            "it)")
    quarter = store_pixel_arcsec(config.shardNside) / 4.0
    if config.shardMargin >= quarter:
        raise ConfigError(
            f"shardMargin ({config.shardMargin:g} arcsec) must be smaller than a quarter of a "
            f"shard at shardNside = {config.shardNside} ({quarter:.4g} arcsec): use a smaller "
            "shardNside or a smaller margin")


def _check_band_names(config: BuildStarsConfig) -> None:
    """Refuse band names the store cannot key (:func:`streamstars.bands.band_name_problem`),
    naming the key: a visit of such a band could never be stored."""
    named = [(f"primaryBands[{i}]", b) for i, b in enumerate(config.primaryBands)]
    named += [(f"requiredBands[{i}]", b) for i, b in enumerate(config.requiredBands)]
    named += [(f"physicalFilterMap.{k}", b) for k, b in config.physicalFilterMap.items()]
    for key, band in named:
        problem = band_name_problem(band)
        if problem is not None:
            raise ConfigError(f"{key} = {band!r}: {problem}")


def to_dict(obj: Any) -> Any:
    """A plain (JSON/TOML-able) representation of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _allowed_for(key: str) -> Allowed | None:
    """The :data:`ALLOWED` entry of the dotted ``key`` (``*`` matching one table key)."""
    parts = key.split(".")
    for pattern, allowed in ALLOWED.items():
        pattern_parts = pattern.split(".")
        if len(pattern_parts) == len(parts) and all(
                p in ("*", k) for p, k in zip(pattern_parts, parts, strict=True)):
            return allowed
    return None


def _describe_allowed(key: str, fallback: str) -> str:
    allowed = _allowed_for(key)
    return allowed.describe() if allowed is not None else fallback


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        value_hint = typing.get_args(hint)[1]
        return {str(k): _coerce(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be {_describe_allowed(where, 'an integer')}, "
                              f"got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be {_describe_allowed(where, 'a number')}, "
                              f"got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(hint, types.UnionType):
        return value
    return value


def from_dict(cls: type[Any], data: dict[str, Any], where: str = "") -> Any:
    """Build config dataclass ``cls`` from a dict; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(
                f"unknown configuration key {path!r}; known keys here: {', '.join(sorted(names))}"
            )
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def load_config(path: str | Path | None = None) -> BuildStarsConfig:
    """Load a TOML config file (fgcmcal field names); ``None`` gives the defaults.

    Raises:
        ConfigError: unreadable file, TOML syntax error, unknown key or wrong type.
    """
    if path is None:
        return BuildStarsConfig()
    table = read_config_table(path)
    try:
        return from_dict(BuildStarsConfig, table)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


#: The settings a snapshot may change (``streamstars snapshot --config``): they are applied
#: when the catalogs are derived from the store and shape nothing stored.  Every other setting
#: shapes the stored data (selection, photometry, association, the reference-star cache) and
#: is fixed when a store is built.
SNAPSHOT_TIME_KEYS: tuple[str, ...] = (
    "requiredBands",
    "isolationRadius",
    "densityCutNside",
    "densityCutMaxPerPixel",
    "randomSeed",
    "reserveFraction",
    "fgcmLoadReferenceCatalog.matchRadius",
)


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> plain value of every field of a config dataclass (tables of values,
    such as ``physicalFilterMap``, are one value)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = to_dict(value)
    return out


def _snapshot_time(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in SNAPSHOT_TIME_KEYS)


def stored_data_differences(stored: BuildStarsConfig,
                            given: BuildStarsConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, stored value, given value) of every setting outside
    :data:`SNAPSHOT_TIME_KEYS` on which two configurations differ."""
    a, b = _flat(stored), _flat(given)
    return [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b))
            if not _snapshot_time(key) and a.get(key) != b.get(key)]


def check_snapshot_config(stored: BuildStarsConfig, given: BuildStarsConfig,
                          source: str = "the snapshot configuration") -> None:
    """Refuse a snapshot configuration that differs from the store's outside
    :data:`SNAPSHOT_TIME_KEYS` (the catalogs could not follow it, and the provenance would
    record settings that were not used).

    Raises:
        ConfigError: naming every such key with the store's and the given value.
    """
    _refuse(source, stored_data_differences(stored, given))


def _refuse(source: str, differences: list[tuple[str, Any, Any]]) -> None:
    if differences:
        details = "; ".join(f"{key} (store: {old!r}, given: {new!r})"
                            for key, old, new in differences)
        refs = any(key.startswith("fgcmLoadReferenceCatalog.") for key, _, _ in differences)
        raise ConfigError(
            f"{source} changes settings that shape the stored data: {details}. A snapshot may "
            f"change only {', '.join(SNAPSHOT_TIME_KEYS)}; remove the others from the file, or "
            "build a new store with them (streamstars backfill REPO --state NEW_DIR --config "
            "FILE)" + ("; the reference catalog settings are changed on the store with "
                       "streamstars refresh-refs --state DIR --config FILE" if refs else ""))


def _overlay(cls: type[Any], base: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in table.items():
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict) and \
                isinstance(base.get(key), dict):
            out[key] = _overlay(hint, base[key], value)  # type: ignore[arg-type]
        else:
            out[key] = value  # a value (maps included) replaces; unknown keys: from_dict
    return out


def load_snapshot_config(path: str | Path, stored: BuildStarsConfig) -> BuildStarsConfig:
    """The configuration of ``snapshot --config FILE``: the store's configuration with the
    file's keys applied (keys the file leaves out keep the store's values).

    Raises:
        ConfigError: the file cannot be read or is invalid, or it changes a setting outside
            :data:`SNAPSHOT_TIME_KEYS` (naming every such key).
    """
    table = read_config_table(path)
    source = f"config file {path}"
    stored_flat = _flat(stored)
    try:
        values = _table_values(BuildStarsConfig, table)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    # the keys the file sets are compared first, so that a refused key is named even when
    # the combination would also be invalid (e.g. matchRadius beyond isolationRadius)
    _refuse(source, [(key, stored_flat.get(key), value) for key, value in values.items()
                     if not _snapshot_time(key) and stored_flat.get(key) != value])
    try:
        given = from_dict(BuildStarsConfig, _overlay(BuildStarsConfig, to_dict(stored), table))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    check_snapshot_config(stored, given, source=source)
    return given


def _table_values(cls: type[Any], table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> plain value (coerced to the field's type) of every value a TOML table
    sets; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"unknown configuration key {path!r}; known keys here: {', '.join(sorted(names))}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            out.update(_table_values(hint, value, path + "."))  # type: ignore[arg-type]
        else:
            coerced = _coerce(value, hint, path)
            allowed = _allowed_for(path)
            if allowed is not None and not allowed.allows(coerced):
                raise ConfigError(f"{path} must be {allowed.describe()}, got {coerced!r}")
            out[path] = to_dict(coerced)
    return out


def read_config_table(path: str | Path) -> dict[str, Any]:
    """The raw TOML table of a config file (keys not yet checked).

    Raises:
        ConfigError: unreadable file, not UTF-8 (TOML files are UTF-8), TOML syntax error;
            the message names the file.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}, line {line}); TOML files must be UTF-8: save it as UTF-8") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def config_from_json(text: str) -> BuildStarsConfig:
    """Rebuild a config stored as JSON (as kept in the state metadata)."""
    return from_dict(BuildStarsConfig, json.loads(text))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _to_toml(data: dict[str, Any], prefix: str = "") -> str:
    scalars = []
    tables = []
    for key, value in data.items():
        is_table = isinstance(value, dict) and key not in (
            "physicalFilterMap",
            "filterMap",
            "colorterms",
        )
        if is_table:
            tables.append((key, value))
        else:
            scalars.append(f"{key} = {_toml_value(value)}")
    out = []
    if prefix:
        out.append(f"[{prefix}]")
    out.extend(scalars)
    text = "\n".join(out)
    for key, value in tables:
        sub = _to_toml(value, f"{prefix}.{key}" if prefix else key)
        text = f"{text}\n\n{sub}" if text else sub
    return text
