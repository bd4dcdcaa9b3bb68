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
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    keying the observation and component records in the LMDB store.
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
    sourceSelector: SourceSelectorConfig = field(default_factory=SourceSelectorConfig)
    fgcmLoadReferenceCatalog: RefcatLoadConfig = field(default_factory=RefcatLoadConfig)

    def __post_init__(self) -> None:
        if not self.primaryBands:
            raise ConfigError("primaryBands must name at least one band")
        if self.minPerBand < 1:
            raise ConfigError(f"minPerBand must be >= 1, got {self.minPerBand}")
        if not self.matchRadius > 0:
            raise ConfigError(f"matchRadius must be > 0 arcsec, got {self.matchRadius}")
        if self.isolationRadius < 2 * self.matchRadius:
            raise ConfigError(
                f"isolationRadius ({self.isolationRadius}) must be at least 2 x matchRadius "
                f"({self.matchRadius}) so that every observation belongs to at most one star"
            )
        for name in ("storeNside", "densityCutNside", "coarseNside"):
            nside = getattr(self, name)
            if nside < 1 or nside & (nside - 1):
                raise ConfigError(f"{name} must be a power of two, got {nside}")
        if not 0.0 <= self.reserveFraction < 1.0:
            raise ConfigError(f"reserveFraction must be in [0, 1), got {self.reserveFraction}")

    # --- derived values -------------------------------------------------------------------
    def band_of(self, physical_filter: str, recorded_band: str) -> str:
        """The band of a visit: ``physicalFilterMap`` first, else the band recorded with it."""
        return self.physicalFilterMap.get(physical_filter, recorded_band)

    def association_fingerprint(self) -> dict[str, Any]:
        """The settings that shape what is *stored*; a store refuses to reopen if they differ.

        Snapshot-time settings (isolation, requiredBands, density cut, seeds) may change freely.
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
            "referenceCCD",
        ):
            data.pop(key)
        return data

    def to_toml(self) -> str:
        """The configuration as TOML, loadable with :func:`load_config`."""
        return _to_toml(to_dict(self))


def to_dict(obj: Any) -> Any:
    """A plain (JSON/TOML-able) representation of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


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
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
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
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    try:
        return from_dict(BuildStarsConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


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
