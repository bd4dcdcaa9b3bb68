"""``build_report``: read a store (and a snapshot), compute the sections, write the page."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamstars import __version__
from streamstars.config import to_dict
from streamstars.report.catalog import ReportCatalog, join_catalog
from streamstars.report.inputs import ReportInputError, SnapshotData, StoreFacts, report_inputs
from streamstars.report.page import (
    DashboardLink,
    PlotImage,
    Section,
    clear_plots,
    render_page,
    save_plot,
    write_page,
)
from streamstars.report.plotting import Plot, require_plotting
from streamstars.report.trends import DEFAULT_OUTLIER_Z, Outlier, find_outliers

__all__ = ["DASHBOARD_FILE", "DASHBOARD_UID", "ReportSummary", "build_report", "iter_sections"]

#: uid of the Grafana dashboard shipped in deploy/grafana/streamstars.json.
DASHBOARD_UID = "streamstars"
#: The dashboard's path in a source checkout (copied beside the page when found).
DASHBOARD_FILE = Path("deploy") / "grafana" / "streamstars.json"
_DASHBOARD_COPY = "grafana-streamstars.json"


@dataclass
class ReportSummary:
    """What :func:`build_report` wrote.

    Attributes:
        index: the page (``OUT/index.html``).
        images: the PNGs, in page order.
        outliers: the visits that stand out (sorted by decreasing |z|).
        n_visits, n_stars, n_observations: counts of the snapshot reported on.
        seconds: wall time of the whole report (snapshot included when one was written).
    """

    index: Path
    images: list[Path]
    outliers: list[Outlier]
    n_visits: int
    n_stars: int
    n_observations: int
    seconds: float


def config_digest(snapshot: SnapshotData, facts: StoreFacts) -> str:
    """First 16 hex digits of the sha256 of the configuration's sorted-key JSON (as recorded
    in the snapshot's provenance; the store's configuration when the snapshot has none)."""
    text = snapshot.provenance.get("config") or json.dumps(to_dict(facts.config),
                                                           sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _provenance(facts: StoreFacts, snapshot: SnapshotData, catalog: ReportCatalog,
                temporary_snapshot: bool) -> list[tuple[str, str]]:
    prov = snapshot.provenance
    per_band = [f"{band} ({int(np.count_nonzero(catalog.visit_band == i))} visits)"
                for i, band in enumerate(catalog.bands)]
    visits = f"{len(catalog.visit):,} in the snapshot, {len(facts.visit):,} in the store"
    if catalog.n_visits_without_record:
        visits += (f" ({catalog.n_visits_without_record} applied after the store's records "
                   "were read: band from their physical filter, no selected-observation count)")
    if len(catalog.visit):
        visits += (f"; visits {catalog.visit[0]}-{catalog.visit[-1]}, MJD "
                   f"{np.nanmin(catalog.visit_mjd):.3f}-{np.nanmax(catalog.visit_mjd):.3f}")
    refcat = "none (no reference catalog configured or matched)"
    if catalog.reference_mag is not None:
        matched = int(np.count_nonzero(np.isfinite(catalog.reference_mag).any(axis=1)))
        name = ""
        try:
            name = str(json.loads(prov.get("refcat", "{}")).get("dataset_name", ""))
        except (json.JSONDecodeError, AttributeError):
            pass
        refcat = f"{name or 'reference catalog'}: {matched:,} stars matched"
    offsets = prov.get("kafka_offsets", "{}")
    rows = [
        ("Store", f"{facts.path.resolve()} (created {facts.created or 'unknown'})"),
        ("Snapshot", ("temporary snapshot written for this report (removed)"
                      if temporary_snapshot else str(snapshot.path.resolve()))),
        ("Snapshot time", prov.get("created", "unknown")),
        ("Visits", visits),
        ("Bands", ", ".join(per_band)),
        ("Stars / observations", f"{catalog.n_stars:,} stars, {len(catalog.obs_star):,} "
                                 "observations"),
        ("Reference stars", refcat),
        ("Config digest", f"{config_digest(snapshot, facts)} (sha256 of the sorted-key JSON of "
                          "the configuration)"),
    ]
    if offsets not in ("", "{}"):
        rows.append(("Kafka offsets", offsets))
    rows.append(("Report", f"written {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by "
                           f"streamstars {__version__} (snapshot by streamstars "
                           f"{prov.get('streamstars_version', 'unknown')})"))
    return rows


def iter_sections(catalog: ReportCatalog, outliers: list[Outlier],
                  threshold: float = DEFAULT_OUTLIER_Z) -> Iterator[tuple[Section, list[Plot]]]:
    """The page's sections, each with its (not yet written) plots, one section at a time so
    that only one section's figures are in memory at once."""
    from streamstars.report.distributions import distribution_plots
    from streamstars.report.reference import reference_plots
    from streamstars.report.skymaps import choose_view, sky_map_plots
    from streamstars.report.trends import trend_plot

    view = choose_view(catalog.star_ra, catalog.star_dec)
    yield (Section("skymaps", "Sky maps",
                   "HEALPix maps per band of what the snapshot holds."),
           sky_map_plots(catalog, view))
    yield (Section("trends", "Per-visit trends",
                   "One point per visit of the snapshot; visits that stand out are circled "
                   "and listed in the table."),
           [trend_plot(catalog, outliers, threshold)])
    yield (Section("distributions", "Distributions", ""), distribution_plots(catalog))
    plots = reference_plots(catalog, view)
    intro = ("Stars matched to the reference catalog, per band." if plots else
             "No reference stars in this snapshot: configure [fgcmLoadReferenceCatalog] "
             "(docs/references.md) to compare with a reference catalog.")
    yield Section("reference", "Reference stars", intro), plots


def _dashboard_link(out_dir: Path, grafana_url: str | None) -> DashboardLink | None:
    if grafana_url:
        href = f"{grafana_url.rstrip('/')}/d/{DASHBOARD_UID}/streamstars"
        return DashboardLink(href, href, f"Dashboard JSON: {DASHBOARD_FILE} in the streamstars "
                                         "source (uid \"streamstars\").")
    source = Path(__file__).resolve().parents[2] / DASHBOARD_FILE
    if source.is_file():
        shutil.copyfile(source, out_dir / _DASHBOARD_COPY)
        return DashboardLink(_DASHBOARD_COPY, f"streamstars ({_DASHBOARD_COPY})",
                             f"A copy of {DASHBOARD_FILE}: import it into Grafana "
                             "(Dashboards > New > Import) and pick the Prometheus data source "
                             "that scrapes the consumer; or give --grafana-url to link a "
                             "running Grafana.")
    return DashboardLink("", DASHBOARD_FILE.as_posix(),
                         "Import it from the streamstars source into Grafana, or give "
                         "--grafana-url to link a running Grafana.")


def build_report(state: str | Path, out: str | Path, snapshot: str | Path | None = None, *,
                 outlier_z: float = DEFAULT_OUTLIER_Z,
                 grafana_url: str | None = None) -> ReportSummary:
    """Write the QA report of a store into ``out`` (``out/index.html`` + ``out/plots/``).

    ``snapshot``: a snapshot directory to read the catalogs from; without it a snapshot of
    the store is written into a temporary directory and removed afterwards.  ``outlier_z``:
    the robust z-score above which a visit is listed.  ``grafana_url``: base URL of a running
    Grafana to link the consumer's dashboard in (else the dashboard JSON is linked).

    Raises:
        ReportDependencyError: the ``streamstars[report]`` extra is not installed.
        ReportInputError: an empty store, a directory that is not a snapshot, ``out`` a file.
        StateError: not a store, or a store of another format version.
    """
    start = time.perf_counter()
    require_plotting()
    if not outlier_z > 0:
        raise ReportInputError(f"the outlier threshold must be positive, got {outlier_z}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportInputError(f"report output {out_dir} exists and is not a directory")
    with report_inputs(state, snapshot) as (facts, snap):
        catalog = join_catalog(snap, facts)
        provenance = _provenance(facts, snap, catalog, temporary_snapshot=snapshot is None)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_plots(out_dir)  # a plot of an earlier report (a reference section since dropped...)
    outliers = find_outliers(catalog, outlier_z)
    sections: list[Section] = []
    images: list[PlotImage] = []
    for section, plots in iter_sections(catalog, outliers, outlier_z):
        section.images = [save_plot(plot, out_dir) for plot in plots]
        images += section.images
        sections.append(section)
    dashboard = _dashboard_link(out_dir, grafana_url)
    index = write_page(out_dir, render_page(provenance, sections, outliers, outlier_z,
                                            dashboard))
    return ReportSummary(index=index, images=[out_dir / image.src for image in images],
                         outliers=outliers, n_visits=len(catalog.visit),
                         n_stars=catalog.n_stars, n_observations=len(catalog.obs_star),
                         seconds=time.perf_counter() - start)
