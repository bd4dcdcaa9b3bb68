"""The ``streamstars`` command line.

Subcommands: ``backfill``, ``snapshot``, ``status``, ``backup``, ``retract``, ``config show``,
``simulate``, ``report``, ``star``, ``cone``, ``query-cache warm``, ``refresh-refs`` and, from
:mod:`streamstars.consumers.cli`, ``run`` and ``publish``.  Exit codes: 0 success, 1 some visits
failed (``star``: no such star), 2 usage or configuration error, 130 interrupted (Ctrl-C: one
line, no traceback; a backfill resumes where it stopped).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamstars import __version__
from streamstars.config import BuildStarsConfig, load_config, load_snapshot_config
from streamstars.errors import ConfigError, StreamstarsError

if TYPE_CHECKING:
    from streamstars.queries import WarmSummary
    from streamstars.sharded_snapshot import ShardedSnapshotSummary
    from streamstars.state import StateDirectory


def _config(args: argparse.Namespace) -> BuildStarsConfig | None:
    return load_config(args.config) if getattr(args, "config", None) else None


def cmd_backfill(args: argparse.Namespace) -> int:
    """Run ``backfill``: apply every visit of a repository; 1 when a visit failed."""
    from streamstars.backfill import backfill
    from streamstars.references import attach_references, open_reference_source
    from streamstars.state import StateDirectory

    config = _config(args) or BuildStarsConfig()
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.butler:
        if args.repo:
            raise ConfigError("give either a repository directory or --butler REPO, not both")
        from streamstars.butler.cli import butler_backfill_inputs

        # the repository, collections and dataset types are checked before the store exists
        inventory, prepare = butler_backfill_inputs(args)
        source_name = f"{args.butler} (collections {args.collections})"
    else:
        if not args.repo:
            raise ConfigError("give the repository directory (or --butler REPO)")
        if not Path(args.repo).is_dir():
            raise ConfigError(f"repository {args.repo} is not a directory")
        inventory, prepare = None, None
        source_name = args.repo
    # a bad reference catalog is refused before the store is even created (exit code 2)
    source = open_reference_source(config.fgcmLoadReferenceCatalog, args.butler)
    with StateDirectory.open(args.state, config) as state:
        references = attach_references(state, source, butler=args.butler)
        before = _shard_generations(state) if args.warm_query_cache else {}
        report = backfill(args.butler or args.repo, state, replace=args.replace,
                          prefetch=args.prefetch, progress=not args.no_progress,
                          inventory=inventory, prepare=prepare, references=references,
                          workers=args.workers, butler=args.butler)
        n_visits = len(state.applied_visits())
        n_shards = len(state.shards())
        warmed = _warm_written_shards(state, before) if args.warm_query_cache else None
    for problem in report.problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    if report.without_sources:
        print(f"note: {len(report.without_sources)} visits have metadata but no source table "
              f"yet (first: {report.without_sources[:5]})", file=sys.stderr)
    for failure in report.failed:
        print(f"FAILED visit {failure.visit}: {failure.error}", file=sys.stderr)
    if report.applied + report.replaced + report.skipped + len(report.failed) == 0 \
            and not report.problems:
        what = "no sourceTable_visit datasets" if args.butler else \
            "no source tables (sourceTable_visit*.parq*, sourceTable-*.parq)"
        print(f"streamstars: {what} found in {source_name}", file=sys.stderr)
        return 1
    rate = report.sources_read / report.seconds if report.seconds else 0.0
    dropped = sum(report.dropped.values())
    dropped_text = (f"{dropped:,} rows dropped for unusable coordinates ("
                    + ", ".join(f"{k} {v:,}" for k, v in sorted(report.dropped.items()))
                    + "); ") if dropped else ""
    print(f"backfill: {report.applied} applied, {report.replaced} replaced, "
          f"{report.skipped} skipped, {len(report.failed)} failed, "
          f"{len(report.problems)} unusable files; "
          f"{report.sources_read:,} sources read, {report.observations_selected:,} observations "
          f"selected in {report.seconds:.1f} s ({rate:,.0f} sources/s); {dropped_text}"
          f"store holds {n_visits} visits in {n_shards} shards")
    if warmed is not None:
        print(f"query cache warmed: {warmed.describe()}")
    return 0 if report.ok else 1


def _shard_generations(state: StateDirectory) -> dict[int, tuple[str | None, int]]:
    from streamstars.queries import shard_generations

    generations = shard_generations(state)
    for pixel in generations:  # the backfill opens them for writing
        state.close_shard(pixel)
    return generations


def _warm_written_shards(state: StateDirectory,
                         before: dict[int, tuple[str | None, int]]) -> WarmSummary:
    """``--warm-query-cache``: warm the density-cut cache of the shards whose generation
    changed since ``before`` (those the backfill wrote)."""
    from streamstars.queries import warm_query_cache

    written = [p for p, generation in _shard_generations(state).items()
               if before.get(p) != generation]
    return warm_query_cache(state, written)


def cmd_query_cache_warm(args: argparse.Namespace) -> int:
    """Run ``query-cache warm``: derive the missing density cuts of the query cache."""
    from streamstars.queries import warm_query_cache

    with _open_readonly(args.state) as state:
        summary = warm_query_cache(state, args.shard or None)
    print(f"query cache warmed: {summary.describe()}")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    """Run ``snapshot``: write the fgcm input catalogs of a store."""
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = [f for f in formats if f not in ("fits", "parquet")]
    if bad or not formats:
        raise SystemExit(f"--format takes fits and/or parquet, got {args.format!r}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    target = None
    if args.butler:
        from streamstars.butler.cli import snapshot_target

        # the repository, RUN and instrument are checked before anything is written
        target = snapshot_target(args, formats)
    if args.from_partitions:
        if args.state or args.config or args.workers != 1:
            raise ConfigError("snapshot --from-partitions SHARED completes the snapshot from the "
                              "shard partitions the consumers wrote: it takes no --state, "
                              "--config or --workers")
        from streamstars.shared_snapshot import complete_shared_snapshot

        completed = complete_shared_snapshot(args.from_partitions, args.out, formats=formats,
                                             force=True)
        assert completed is not None  # force: always written
        summary = completed
    elif not args.state:
        raise ConfigError("snapshot needs --state DIR (repeatable) or --from-partitions SHARED")
    else:
        summary = _snapshot_states(args, formats)
    _print_snapshot(summary)
    if target is not None:
        ingested = target.ingest(summary.out_dir)
        print(f"snapshot: {len(ingested.refs)} datasets ingested into RUN {ingested.run} of "
              f"{args.butler} (instrument {ingested.instrument}"
              + (f"; first in {ingested.chain}" if ingested.chain else "") + ")")
    return 0


def _snapshot_states(args: argparse.Namespace,
                     formats: tuple[str, ...]) -> ShardedSnapshotSummary:
    """``snapshot OUT --state DIR [--state DIR ...]``: the summary of the snapshot written."""
    from contextlib import ExitStack

    from streamstars.sharded_snapshot import write_states_snapshot
    from streamstars.state import StateDirectory

    with ExitStack() as stack:
        # several --state: the directories of consumers in one group (each shard from the
        # copy at the highest partition offset)
        states = [stack.enter_context(StateDirectory.open(path, readonly=True))
                  for path in args.state]
        # the file's keys are applied on top of the store's configuration; a key that shapes
        # the stored data must keep the store's value (ConfigError naming it otherwise)
        config = load_snapshot_config(args.config, states[0].config) if args.config else None
        return write_states_snapshot(states, args.out, formats=formats, config=config,
                                     workers=args.workers)


def _print_snapshot(summary: ShardedSnapshotSummary) -> None:
    print(f"snapshot: {summary.n_visits} visits, {summary.n_stars:,} stars, "
          f"{summary.n_observations:,} observations -> {summary.out_dir} "
          f"({summary.seconds:.1f} s; shard partitions: {summary.written} written, "
          f"{summary.reused} reused)")
    if summary.violations:
        print(f"WARNING: {len(summary.violations)} margin violation(s): a friends-of-friends "
              "chain reaches past shardMargin, so stars near a shard border may differ from an "
              "unsharded store; listed in SNAPSHOT.json \"shards\"; rebuild the state with a "
              "larger shardMargin (docs/state.md)", file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    """Run ``status``: print what a state directory holds (``--json``: machine-readable)."""
    from streamstars.status import state_status

    with _open_readonly(args.state) as state:
        status = state_status(state, margins=args.margins)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        for key, value in status.items():
            print(f"{key}: {value}")
    return 0


def _open_readonly(path: str) -> StateDirectory:
    from streamstars.state import StateDirectory

    return StateDirectory.open(path, readonly=True)


def cmd_backup(args: argparse.Namespace) -> int:
    """Run ``backup``: a compact copy of a state directory, each shard consistent."""
    with _open_readonly(args.state) as state:
        dest = state.backup(args.dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"backup: {args.state} -> {dest} ({size / 1e6:,.1f} MB)")
    return 0


def cmd_retract(args: argparse.Namespace) -> int:
    """Run ``retract``: remove visits completely from a state directory (every shard)."""
    from streamstars.ingest import retract_visit
    from streamstars.state import StateDirectory

    with StateDirectory.open(args.state) as state:
        for visit in args.visits:
            result = retract_visit(state, visit)
            print(f"visit {visit}: {result.status}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Run ``config show``: print the effective configuration as TOML."""
    if args.state:
        with _open_readonly(args.state) as state:
            print(state.config.to_toml())
    else:
        print((_config(args) or BuildStarsConfig()).to_toml())
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run ``simulate``: write a simulated survey in the Rubin formats."""
    from streamstars.simulate import simulate_survey

    _check_simulate_arguments(args)
    if args.butler:
        from streamstars.butler.repo import require_butler

        require_butler("streamstars simulate --butler")  # before minutes of simulation
    try:
        survey = simulate_survey(args.out, n_visits=args.visits, seed=args.seed,
                                 sources_per_visit=args.sources_per_visit, crowded=args.crowded,
                                 ra_center=args.ra, dec_center=args.dec,
                                 field_radius_deg=args.field_radius,
                                 n_detectors=args.n_detectors, camera=args.camera,
                                 survey_radius_deg=args.survey_radius,
                                 border_nside=args.border_nside, first_visit=args.first_visit,
                                 write_refcat=not args.no_refcat, file_style=args.file_style)
    except ValueError as exc:
        raise ConfigError(f"cannot simulate: {exc}") from exc
    print(f"simulated {len(survey.visits)} visits ({survey.n_sources:,} sources) in {args.out}")
    if args.survey_radius is not None:
        print(f"wide survey: {survey.n_objects:,} true objects within {args.survey_radius} deg, "
              f"{survey.n_tiles} tiles a pass")
    if args.border_nside is not None:
        print(f"{survey.n_border_stars} stars on the borders of the nside {args.border_nside} "
              f"pixels (the last ones of truth.parquet)")
    if args.butler:
        from streamstars.butler.simulate import write_survey_repo

        written = write_survey_repo(survey, args.butler, instrument=args.instrument,
                                    source_storage_class=args.file_style)
        print(f"Butler repository {written.repo}: {written.n_datasets} datasets of instrument "
              f"{written.instrument} in collection {written.collection} (RUN {written.run})")
    return 0


def _check_simulate_arguments(args: argparse.Namespace) -> None:
    """Refuse ``simulate`` arguments out of range, naming the option (ConfigError)."""
    if args.visits < 1:
        raise ConfigError(f"--visits must be at least 1, got {args.visits}")
    if args.sources_per_visit < 1:
        raise ConfigError(f"--sources-per-visit must be at least 1, got {args.sources_per_visit}")
    if not (math.isfinite(args.ra) and math.isfinite(args.dec) and -90.0 <= args.dec <= 90.0):
        raise ConfigError(f"--ra must be finite and --dec within [-90, 90], got {args.ra}, "
                          f"{args.dec}")
    if not args.field_radius > 0:
        raise ConfigError(f"--field-radius must be positive, got {args.field_radius}")
    if args.survey_radius is not None and not args.field_radius <= args.survey_radius <= 180:
        raise ConfigError(f"--survey-radius must be within [--field-radius, 180] = "
                          f"[{args.field_radius}, 180], got {args.survey_radius}")
    nside = args.border_nside
    if nside is not None and (nside < 1 or nside & (nside - 1)):
        raise ConfigError(f"--border-nside must be a power of two, got {nside}")
    if args.first_visit < 0:
        raise ConfigError(f"--first-visit must be at least 0, got {args.first_visit}")


def cmd_report(args: argparse.Namespace) -> int:
    """Run ``report``: write the HTML quality report of a store."""
    from streamstars.report import build_report

    summary = build_report(args.state, args.out, args.snapshot, outlier_z=args.outlier_z,
                           grafana_url=args.grafana_url)
    print(f"report: {summary.n_visits} visits, {summary.n_stars:,} stars, "
          f"{len(summary.images)} plots, {len(summary.outliers)} outlier entries -> "
          f"{summary.index} ({summary.seconds:.1f} s)")
    return 0


def cmd_star(args: argparse.Namespace) -> int:
    """Run ``star``: one star as the snapshot would publish it; 1 when there is none."""
    from streamstars.errors import StarNotFoundError
    from streamstars.queries import observation_records, star_query

    with _open_readonly(args.state) as state:
        try:
            result = star_query(state, args.id)
        except StarNotFoundError as exc:
            print(f"streamstars: {exc}", file=sys.stderr)
            return 1
    stars = result.stars
    counts = result.per_band_counts()[0]
    observations = observation_records(result, 0)
    if args.json:
        print(json.dumps({"fgcm_id": int(stars.star_id[0]), "ra": float(stars.ra[0]),
                          "dec": float(stars.dec[0]), "flags": int(stars.obj_flag[0]),
                          "n_obs": int(stars.n_obs[0]), "n_obs_per_band": counts,
                          "observations": observations}, indent=1))
        return 0
    flags = int(stars.obj_flag[0])
    print(f"star {int(stars.star_id[0])}: ra {float(stars.ra[0]):.8f} dec "
          f"{float(stars.dec[0]):.8f} flags {flags}{' (reserved)' if flags & 16 else ''}; "
          f"{int(stars.n_obs[0])} observations ("
          + ", ".join(f"{b} {n}" for b, n in counts.items()) + ")")
    columns = ("visit", "band", "mjd", "source_id", "detector", "inst_mag", "inst_mag_err",
               "delta_mag_aper", "x", "y")
    print("  ".join(f"{c:>14}" for c in columns))
    for obs in observations:
        print("  ".join(_cell(obs[c]) for c in columns))
    return 0


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:>14.6f}"
    return f"{'nan' if value is None else value!s:>14}"


def cmd_cone(args: argparse.Namespace) -> int:
    """Run ``cone``: the stars of a cone as the snapshot would publish them."""
    import numpy as np

    from streamstars.queries import cone_query
    from streamstars.sky import arcsec_from_chord, unit_vectors

    with _open_readonly(args.state) as state:
        result = cone_query(state, args.ra, args.dec, args.radius)
    stars = result.stars
    centre = unit_vectors(np.array([args.ra]), np.array([args.dec]))[0]
    distance = arcsec_from_chord(np.sqrt(((unit_vectors(stars.ra, stars.dec) - centre) ** 2)
                                         .sum(axis=-1))) if len(stars.star_id) else np.zeros(0)
    rows = [{"fgcm_id": int(i), "ra": float(r), "dec": float(d), "flags": int(f),
             "n_obs": int(n), "n_obs_per_band": c, "distance_arcsec": float(s)}
            for i, r, d, f, n, c, s in zip(stars.star_id, stars.ra, stars.dec, stars.obj_flag,
                                           stars.n_obs, result.per_band_counts(), distance,
                                           strict=True)]
    if args.json:
        print(json.dumps({"ra": args.ra, "dec": args.dec, "radius_arcsec": args.radius,
                          "n_stars": len(rows), "shards": result.shards, "stars": rows},
                         indent=1))
        return 0
    print(f"cone ra {args.ra} dec {args.dec} radius {args.radius}\": {len(rows)} stars "
          f"(shards read: {len(result.shards)}, store pixels read: {result.pixels_read})")
    if rows:
        print(f"{'fgcm_id':>20} {'ra':>13} {'dec':>13} {'flags':>5} {'n_obs':>5} "
              f"{'dist_as':>8}  per band")
    for row in rows:
        bands = " ".join(f"{b}:{n}" for b, n in row["n_obs_per_band"].items())
        print(f"{row['fgcm_id']:>20} {row['ra']:>13.8f} {row['dec']:>13.8f} {row['flags']:>5} "
              f"{row['n_obs']:>5} {row['distance_arcsec']:>8.3f}  {bands}")
    return 0


def add_butler_input_options(p: argparse.ArgumentParser) -> None:
    """``--butler REPO --collections C[,C...] [--instrument I] [--where EXPR]``."""
    g = p.add_argument_group("Butler repository (needs streamstars[butler]; docs/butler.md)")
    g.add_argument("--butler", metavar="REPO",
                   help="read the visits from this Butler repository instead of a directory")
    g.add_argument("--collections", metavar="C[,C...]",
                   help="collections to search, in order (first match wins); with --butler")
    g.add_argument("--instrument", help="instrument of the visits (required when the "
                   "collections hold several)")
    g.add_argument("--where", metavar="EXPR", default="",
                   help="Butler query expression on the data IDs, e.g. \"visit > 100\"")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="streamstars",
        description="Incremental builder of the fgcm star catalogs (fgcmcal build-stars).")
    parser.add_argument("--version", action="version", version=f"streamstars {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_backfill(sub)
    _add_snapshot(sub)
    _add_store_commands(sub)
    _add_simulate(sub)
    _add_report(sub)
    _add_queries(sub)
    _add_plugged_commands(sub)
    return parser


def _add_backfill(sub: Any) -> None:
    p = sub.add_parser("backfill", help="apply every visit of a repository (resumable)")
    p.add_argument("repo", nargs="?",
                   help="directory tree with sourceTable_visit and metadata files")
    add_butler_input_options(p)
    p.add_argument("--state", required=True,
                   help="state directory (manifest, visit index, one LMDB store per sky shard)")
    p.add_argument("--config", help="TOML config with fgcmcal field names")
    p.add_argument("--replace", action="store_true",
                   help="replace visits whose content changed since they were applied")
    p.add_argument("--prefetch", type=int, default=2,
                   help="visits read and selected ahead in threads (default 2)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes reading the visits and writing the shards, each owning a "
                   "share of the shards (default 1: this process, with --prefetch threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--warm-query-cache", action="store_true",
                   help="at the end, derive the density cut of every density pixel of the "
                   "shards written, so the first star / cone query there is fast "
                   "(docs/queries.md)")
    p.set_defaults(func=cmd_backfill)


def _add_snapshot(sub: Any) -> None:
    p = sub.add_parser("snapshot", help="write the fgcm input catalogs from a store")
    p.add_argument("out", help="output directory (replaced atomically)")
    p.add_argument("--state", action="append", metavar="DIR",
                   help="state directory; repeat it for the directories of consumers in one "
                   "group: each shard is taken from the copy at the highest partition offset")
    p.add_argument("--from-partitions", metavar="SHARED",
                   help="instead of --state: complete the snapshot from the newest shard "
                   "partitions consumers wrote into SHARED (run --snapshot-dir SHARED "
                   "--snapshot-shared)")
    p.add_argument("--format", default="fits,parquet", help="fits,parquet (default both)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes deriving the shards' stars in parallel (default 1)")
    p.add_argument("--config", help="TOML whose keys are applied on top of the store's "
                   "configuration; only snapshot-time settings (requiredBands, isolationRadius, "
                   "density cut, randomSeed, reserveFraction, fgcmLoadReferenceCatalog."
                   "matchRadius) may differ from the store's")
    g = p.add_argument_group("Butler repository (needs streamstars[butler]; docs/butler.md)")
    g.add_argument("--butler", metavar="REPO", help="also ingest the snapshot into this "
                   "repository as the datasets fgcmFitCycle reads")
    g.add_argument("--output-run", metavar="RUN", help="the new RUN collection to ingest into "
                   "(required with --butler; an existing RUN is refused)")
    g.add_argument("--output-chain", metavar="CHAIN", help="also put RUN first in this CHAINED "
                   "collection (created if needed): a fixed name for the latest snapshot")
    g.add_argument("--instrument", help="instrument of the outputs (default: the "
                   "repository's only instrument)")
    p.set_defaults(func=cmd_snapshot)


def _add_store_commands(sub: Any) -> None:
    """``status``, ``backup``, ``retract`` and ``config show``."""
    p = sub.add_parser("status", help="what a store holds")
    p.add_argument("--state", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--margins", action="store_true", help="also run every shard's margin "
                   "completeness check (what a snapshot reports; reads every stored position)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("backup", help="compact copy of a state directory while it is written "
                       "(each shard consistent)")
    p.add_argument("dest", help="new (or empty) directory for the copy")
    p.add_argument("--state", required=True, help="state directory to copy")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("retract", help="remove visits completely from a store")
    p.add_argument("visits", type=int, nargs="+")
    p.add_argument("--state", required=True)
    p.set_defaults(func=cmd_retract)

    p = sub.add_parser("config", help="configuration commands")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the effective configuration as TOML")
    show.add_argument("--config", help="TOML file to load")
    show.add_argument("--state", help="print the configuration a store was built with")
    show.set_defaults(func=cmd_config_show)


def _add_simulate(sub: Any) -> None:
    p = sub.add_parser("simulate", help="write a simulated survey in the Rubin formats")
    p.add_argument("out")
    p.add_argument("--visits", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sources-per-visit", type=int, default=5000)
    p.add_argument("--crowded", action="store_true")
    p.add_argument("--ra", type=float, default=150.0, help="field centre RA [deg]")
    p.add_argument("--dec", type=float, default=2.0, help="field centre Dec [deg]")
    p.add_argument("--field-radius", type=float, default=1.0, metavar="DEG",
                   help="the camera's field: the focal plane and its dithers fit in it; "
                   "without --survey-radius also the cap of true objects (default 1.0)")
    p.add_argument("--camera", choices=("grid", "lsstcam"), default="grid",
                   help="a near-square grid of 4k CCDs shrunk to fit the field (default), or "
                   "LSSTCam's 189 CCDs (9.3 deg^2; needs --field-radius 2.57 or more)")
    p.add_argument("--n-detectors", type=int, metavar="N",
                   help="CCDs of the camera (default 9 for grid, 189 for lsstcam)")
    p.add_argument("--survey-radius", type=float, metavar="DEG",
                   help="a wide survey: true objects over this cap, visits spread over it on a "
                   "tiling by the camera's field, bands cycling (default: every visit dithers "
                   "around the field centre)")
    p.add_argument("--border-nside", type=int, metavar="K",
                   help="also place bright stars exactly on the boundaries and corners of the "
                   "HEALPix nest pixels at nside K inside the footprint")
    p.add_argument("--first-visit", type=int, default=0, metavar="N",
                   help="write visits N .. N+VISITS-1 of the same survey (same sky, the visit "
                   "ids that follow the first N visits' ones; default 0)")
    p.add_argument("--no-refcat", action="store_true", help="do not write the reference catalog")
    p.add_argument("--file-style", choices=("ArrowAstropy", "DataFrame"),
                   default="ArrowAstropy", help="write the source tables as an ArrowAstropy "
                   "(default) or a pandas DataFrame dataset (older pipelines)")
    p.add_argument("--butler", metavar="REPO", help="also write the survey as a new Butler "
                   "repository (needs streamstars[butler]; docs/butler.md)")
    p.add_argument("--instrument", default="SimCam", help="instrument name in the Butler "
                   "repository (default %(default)s)")
    p.set_defaults(func=cmd_simulate)


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="write an HTML quality report of a store (docs/report.md)")
    p.add_argument("out", help="output directory: OUT/index.html and OUT/plots/*.png")
    p.add_argument("--state", required=True, help="state directory (opened read-only)")
    p.add_argument("--snapshot", help="snapshot directory to report on (default: snapshot the "
                   "store into a temporary directory)")
    p.add_argument("--outlier-z", type=float, default=5.0, metavar="Z",
                   help="list visits whose robust z-score within their band exceeds Z "
                   "(default %(default)s)")
    p.add_argument("--grafana-url", metavar="URL",
                   help="base URL of a Grafana serving deploy/grafana/streamstars.json, linked "
                   "from the page")
    p.set_defaults(func=cmd_report)


def _add_queries(sub: Any) -> None:
    """``star`` and ``cone`` (docs/queries.md)."""
    p = sub.add_parser("star", help="one star as the snapshot would publish it, with every "
                       "observation (docs/queries.md)")
    p.add_argument("id", type=int, metavar="ID", help="the star's fgcm_id (the smallest "
                   "sourceId of its members)")
    p.add_argument("--state", required=True, help="state directory (opened read-only)")
    p.add_argument("--json", action="store_true", help="one JSON object: fgcm_id, ra, dec, "
                   "flags, n_obs, n_obs_per_band, observations")
    p.set_defaults(func=cmd_star)
    p = sub.add_parser("cone", help="the stars of a cone as the snapshot would publish them, "
                       "with their per-band counts (docs/queries.md)")
    p.add_argument("ra", type=float, metavar="RA", help="centre RA [deg]")
    p.add_argument("dec", type=float, metavar="DEC", help="centre Dec [deg]")
    p.add_argument("radius", type=float, metavar="RADIUS_ARCSEC", help="radius [arcsec]")
    p.add_argument("--state", required=True, help="state directory (opened read-only)")
    p.add_argument("--json", action="store_true", help="one JSON object: the cone and its "
                   "stars (fgcm_id, ra, dec, flags, n_obs, n_obs_per_band, distance_arcsec)")
    p.set_defaults(func=cmd_cone)
    p = sub.add_parser("query-cache", help="the star / cone queries' density-cut cache "
                       "(docs/queries.md)")
    cache_sub = p.add_subparsers(dest="query_cache_command", required=True)
    warm = cache_sub.add_parser("warm", help="derive the density cut of every density pixel "
                                "not cached for its shard's current data (read-only on the "
                                "store; safe while a writer runs)")
    warm.add_argument("--state", required=True, help="state directory (opened read-only)")
    warm.add_argument("--shard", type=int, action="append", metavar="PIXEL",
                      help="only this shard (nest pixel at shardNside; repeatable; default: "
                      "every shard)")
    warm.set_defaults(func=cmd_query_cache_warm)


#: Subcommands defined in other modules (each has ``add_commands(sub)``): the module and the
#: subcommands it adds.
PLUGGED_COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("streamstars.refs_cli", ("refresh-refs",)),
    ("streamstars.consumers.cli", ("run", "publish")),
)


class CommandUnavailableError(StreamstarsError):
    """A subcommand's module could not be imported (a broken installation)."""


def _add_plugged_commands(sub: Any) -> None:
    """Add the subcommands of :data:`PLUGGED_COMMANDS`.

    A module that fails to import does not take the other commands down with it: its
    subcommands stay listed, marked unavailable, and running one fails (exit code 2) naming
    the module and the import error.  None of these modules belongs to an optional extra, so
    a failed import means a broken installation, not something to install.
    """
    for module_name, names in PLUGGED_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            reason = (f"importing {module_name} failed ({type(exc).__name__}: {exc}); the "
                      "streamstars installation is broken: reinstall it")
            for name in names:
                # no option prefix: whatever follows is accepted, so that running the command
                # reports why it is unavailable instead of a usage error
                p = sub.add_parser(name, add_help=False, prefix_chars="\0",
                                   help=f"(unavailable: {reason})")
                p.add_argument("arguments", nargs="*")
                p.set_defaults(func=functools.partial(_unavailable, name, reason))
        else:
            module.add_commands(sub)


def _unavailable(name: str, reason: str, args: argparse.Namespace) -> int:
    raise CommandUnavailableError(f"the {name} command is unavailable: {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamstars`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except StreamstarsError as exc:
        print(f"streamstars: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ("; the visits applied so far are kept (one in progress is completed by the "
                "next run): run the same command again to resume") \
            if args.command == "backfill" else ""
        print(f"streamstars: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
