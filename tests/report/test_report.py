"""``streamstars report``: the page of a simulated survey (with a reference catalog and one visit
made odd on purpose), every image decoded and holding data, the outlier table, bad inputs, the
Grafana dashboard, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import re
import sys
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import lmdb
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

pytest.importorskip("matplotlib", reason="the report extra is not installed "
                    "(pip install 'streamstars[report]')")
pytest.importorskip("skyproj", reason="the report extra is not installed "
                    "(pip install 'streamstars[report]')")

from matplotlib.image import imread  # noqa: E402

from streamstars.cli import main  # noqa: E402
from streamstars.config import BuildStarsConfig  # noqa: E402
from streamstars.consumers.metrics import ConsumerMetrics  # noqa: E402
from streamstars.report.build import DASHBOARD_UID, iter_sections  # noqa: E402
from streamstars.report.catalog import ReportCatalog, join_catalog  # noqa: E402
from streamstars.report.inputs import report_inputs  # noqa: E402
from streamstars.report.skymaps import DEPTH_SNR, depth_magnitudes  # noqa: E402
from streamstars.report.stats import group_median, robust_z  # noqa: E402
from streamstars.report.trends import find_outliers  # noqa: E402
from streamstars.simulate import simulate_survey  # noqa: E402
from streamstars.state import StarStore, StateDirectory  # noqa: E402
from streamstars.state.schema import DB_META, META_FORMAT_VERSION  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
#: Chromium as root in a container (the flags the issue asks for; the profile is added per run).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
N_VISITS = 24
SKY_FACTOR = 12.0  # the odd visit's sky background, times its ordinary value


@dataclass
class Rendered:
    repo: Path
    state: Path
    out: Path
    odd_visit: int
    tmpdir: Path


def _make_odd(repo: Path, visit: int) -> None:
    """Multiply one visit's per-detector sky background in the ccdVisitTable by SKY_FACTOR."""
    path = repo / "ccdVisitTable.parquet"
    table = pq.read_table(path)
    is_odd = pc.equal(table["visitId"], visit)
    sky = pc.if_else(is_odd, pc.multiply(table["skyBg"], SKY_FACTOR), table["skyBg"])
    table = table.set_column(table.schema.get_field_index("skyBg"), "skyBg", sky)
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """A simulated survey with one odd visit, backfilled with its reference catalog, reported
    through the command line (which snapshots the store into a temporary directory)."""
    root = tmp_path_factory.mktemp("report")
    repo, state, out = root / "repo", root / "state", root / "out"
    survey = simulate_survey(repo, n_visits=N_VISITS, seed=3, sources_per_visit=3000,
                             field_radius_deg=0.7)
    odd_visit = int(survey.visits[10])
    _make_odd(repo, odd_visit)
    config = root / "refs.toml"
    config.write_text(
        "[fgcmLoadReferenceCatalog]\n"
        f"path = \"{repo / 'refcat'}\"\n"
        "filterMap = { \"g_6\" = \"g\", \"r_57\" = \"r\", \"i_39\" = \"i\", \"z_20\" = \"z\" }\n")
    assert main(["backfill", str(repo), "--state", str(state), "--config", str(config),
                 "--no-progress"]) == 0
    tmpdir = root / "tmp"
    tmpdir.mkdir()
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmpdir)  # where the report's temporary snapshot goes
    try:
        assert main(["report", str(out), "--state", str(state)]) == 0
    finally:
        tempfile.tempdir = saved
    return Rendered(repo, state, out, odd_visit, tmpdir)


@pytest.fixture(scope="module")
def catalog(rendered: Rendered) -> ReportCatalog:
    with report_inputs(rendered.state) as (facts, snapshot):
        return join_catalog(snapshot, facts)


class _Page(HTMLParser):
    """The parts of the page the tests look at."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "img":
            self.images.append(str(a["src"]))
        elif tag == "a" and a.get("href"):
            self.links.append(str(a["href"]))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _page(rendered: Rendered) -> tuple[str, _Page]:
    text = (rendered.out / "index.html").read_text()
    parser = _Page()
    parser.feed(text)
    return text, parser


def _finite_values(ax: object) -> int:
    """How many finite data values the artists of a matplotlib axes hold."""
    n = 0
    for line in ax.lines:  # type: ignore[attr-defined]
        n += int(np.isfinite(line.get_xydata()).all(axis=1).sum())
    for collection in ax.collections:  # type: ignore[attr-defined]
        array = collection.get_array()
        if array is not None:
            n += int(np.isfinite(np.ma.filled(np.ma.asarray(array, dtype=float), np.nan)).sum())
        else:
            n += int(np.isfinite(collection.get_offsets()).all(axis=1).sum())
    for image in ax.images:  # type: ignore[attr-defined]
        n += int(np.isfinite(np.ma.filled(np.ma.asarray(image.get_array(), float), np.nan)).sum())
    for patch in ax.patches:  # type: ignore[attr-defined]
        xy = patch.get_path().vertices
        if len(xy) and np.ptp(xy[:, 1]) > 0:  # a histogram's bars / step outline
            n += int(np.isfinite(xy).all(axis=1).sum())
    return n


# ------------------------------------------------------------------------------------ page
def test_page_has_every_section_and_the_provenance(rendered: Rendered) -> None:
    text, page = _page(rendered)
    for anchor in ("provenance", "skymaps", "trends", "distributions", "reference", "outliers",
                   "monitoring", "sky_stars", "sky_nobs", "sky_depth", "sky_visits",
                   "dist_nobs", "dist_mag", "dist_positions", "ref_vs_mag", "ref_vs_position"):
        assert anchor in page.ids, anchor
    header = {row[0]: row[1] for row in page.rows if len(row) == 2}
    assert str(rendered.state.resolve()) in header["Store"]
    assert header["Visits"].startswith(f"{N_VISITS} in the snapshot, {N_VISITS} in the store")
    assert header["Bands"] == "g (6 visits), r (6 visits), i (6 visits), z (6 visits)"
    assert re.fullmatch(r"[0-9a-f]{16} .*", header["Config digest"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", header["Snapshot time"])
    assert "sim_refcat" in header["Reference stars"]
    assert "temporary snapshot" in header["Snapshot"]
    assert "http://" not in text and "https://" not in text  # nothing from the network


def test_every_image_decodes_and_is_not_blank(rendered: Rendered) -> None:
    _, page = _page(rendered)
    assert len(page.images) == 10
    for src in page.images:
        pixels = imread(rendered.out / src)  # PNG -> float RGBA array
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300, src
        colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
        assert len(colours) > 50, f"{src}: {len(colours)} colours"
        background = np.all(pixels[..., :3] > 0.97, axis=2)
        assert background.mean() < 0.97, f"{src} is nearly empty"


def test_every_plotted_axes_holds_finite_data(catalog: ReportCatalog) -> None:
    outliers = find_outliers(catalog)
    names = []
    for _section, plots in iter_sections(catalog, outliers):
        for plot in plots:
            names.append(plot.name)
            panels = [ax for ax in plot.figure.axes
                      if ax.get_visible() and ax.get_label() != "<colorbar>"]
            assert panels, plot.name
            for ax in panels:
                assert _finite_values(ax) > 0, f"{plot.name}: empty panel {ax.get_title()!r}"
            assert plot.caption.strip()
    assert names == ["sky_stars", "sky_nobs", "sky_depth", "sky_visits", "trends", "dist_nobs",
                     "dist_mag", "dist_positions", "ref_vs_mag", "ref_vs_position"]


def test_outlier_table_names_the_odd_visit(rendered: Rendered, catalog: ReportCatalog) -> None:
    _, page = _page(rendered)
    rows = [row for row in page.rows if row and row[0] == str(rendered.odd_visit)]
    assert rows, "the odd visit is not in the outlier table"
    assert any(row[3] == "sky background" and "above" in row[7] for row in rows)
    sky = [o for o in find_outliers(catalog) if o.metric == "sky background"]
    assert [o.visit for o in sky] == [rendered.odd_visit]
    assert sky[0].value == pytest.approx(SKY_FACTOR * sky[0].band_median, rel=0.5)


def test_temporary_snapshot_is_removed(rendered: Rendered) -> None:
    assert list(rendered.tmpdir.iterdir()) == []


def test_report_from_a_given_snapshot(rendered: Rendered, tmp_path: Path) -> None:
    snapshot = tmp_path / "snap"
    assert main(["snapshot", str(snapshot), "--state", str(rendered.state)]) == 0
    out = tmp_path / "out"
    assert main(["report", str(out), "--state", str(rendered.state), "--snapshot",
                 str(snapshot), "--grafana-url", "http://127.0.0.1:3000/"]) == 0
    page = _Page()
    page.feed((out / "index.html").read_text())
    header = {row[0]: row[1] for row in page.rows if len(row) == 2}
    assert header["Snapshot"] == str(snapshot.resolve())
    assert "http://127.0.0.1:3000/d/streamstars/streamstars" in page.links
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(
        Path(src).name for src in page.images)


def test_report_without_reference_catalog(tmp_path: Path) -> None:
    repo, state, out = tmp_path / "repo", tmp_path / "state", tmp_path / "out"
    simulate_survey(repo, n_visits=8, seed=5, sources_per_visit=1500, field_radius_deg=0.5,
                    write_refcat=False)
    assert main(["backfill", str(repo), "--state", str(state), "--no-progress"]) == 0
    assert main(["report", str(out), "--state", str(state)]) == 0
    text = (out / "index.html").read_text()
    assert "No reference stars in this snapshot" in text
    assert not (out / "plots" / "ref_vs_mag.png").exists()


# ------------------------------------------------------------------------------ bad input
def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_empty_store_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    StateDirectory.open(tmp_path / "state", BuildStarsConfig()).close()
    err = _error(capsys, ["report", str(tmp_path / "out"), "--state", str(tmp_path / "state")])
    assert "holds no visits" in err and "backfill" in err
    assert not (tmp_path / "out").exists()


def test_store_of_another_format_is_refused(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    StarStore.open(tmp_path / "state", BuildStarsConfig()).close()
    env = lmdb.open(str(tmp_path / "state"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(META_FORMAT_VERSION, b"99", db=env.open_db(DB_META, txn=txn))
    env.close()
    err = _error(capsys, ["report", str(tmp_path / "out"), "--state", str(tmp_path / "state")])
    assert "format version 99" in err


def test_directory_that_is_not_a_store_is_refused(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state").mkdir()
    err = _error(capsys, ["report", str(tmp_path / "out"), "--state", str(tmp_path / "state")])
    assert "not a streamstars state directory" in err


def test_snapshot_directory_that_is_not_a_snapshot(rendered: Rendered, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notsnap").mkdir()
    (tmp_path / "notsnap" / "notes.txt").write_text("hello")
    err = _error(capsys, ["report", str(tmp_path / "out"), "--state", str(rendered.state),
                          "--snapshot", str(tmp_path / "notsnap")])
    assert "is not a streamstars snapshot" in err and "SNAPSHOT.json" in err
    err = _error(capsys, ["report", str(tmp_path / "out"), "--state", str(rendered.state),
                          "--snapshot", str(tmp_path / "missing")])
    assert "is not a directory" in err


def test_fits_only_snapshot_is_refused(rendered: Rendered, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    snapshot = tmp_path / "fits"
    assert main(["snapshot", str(snapshot), "--state", str(rendered.state),
                 "--format", "fits"]) == 0
    err = _error(capsys, ["report", str(tmp_path / "out"), "--state", str(rendered.state),
                          "--snapshot", str(snapshot)])
    assert "--format parquet" in err


def test_missing_plotting_library_names_the_extra(rendered: Rendered, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skyproj", None)  # `import skyproj` raises ImportError
    err = _error(capsys, ["report", str(tmp_path / "out"), "--state", str(rendered.state)])
    assert "skyproj" in err and "pip install 'streamstars[report]'" in err


# ------------------------------------------------------------------------- statistics
def test_group_median_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 50, 5000)
    values = rng.normal(size=5000)
    unique, median, counts = group_median(keys, values)
    assert unique.tolist() == sorted(set(keys.tolist()))
    for key, med, count in zip(unique, median, counts, strict=True):
        assert med == np.median(values[keys == key])
        assert count == np.count_nonzero(keys == key)


def test_robust_z_flags_a_planted_value_in_its_group_only() -> None:
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(100, 5, 40), rng.normal(1000, 50, 40)])
    groups = np.repeat([0, 1], 40)
    values[3] = 160.0  # 12 sigma in group 0, ordinary for group 1
    z, median = robust_z(values, groups)
    assert np.flatnonzero(np.abs(z) > 5).tolist() == [3]
    assert median[3] == pytest.approx(100, abs=3)


def test_depth_recovers_the_magnitude_at_snr_10() -> None:
    # background-limited sources: one flux error for all, so err = 1.0857 / SNR
    m10 = 24.0
    flux_err = 10 ** (-0.4 * m10) / DEPTH_SNR
    mags = np.linspace(20.5, 24.0, 50)
    errors = 2.5 / np.log(10) * flux_err / 10 ** (-0.4 * mags)
    depth = depth_magnitudes(mags, errors)
    usable = np.isfinite(depth)
    assert usable.sum() > 10 and not usable[0]  # bright (err < 0.03) ones are not used
    np.testing.assert_allclose(depth[usable], m10, atol=1e-9)


# ------------------------------------------------------------------------------ Grafana
def test_grafana_dashboard_covers_every_consumer_metric(rendered: Rendered) -> None:
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "streamstars.json").read_text())
    assert dashboard["uid"] == DASHBOARD_UID
    exprs = " ".join(target["expr"] for panel in dashboard["panels"]
                     for target in panel.get("targets", []))
    metrics = ConsumerMetrics()
    families = list(metrics.registry.collect())
    assert len(families) >= 15
    suffix = {"counter": "_total", "histogram": "_bucket", "gauge": ""}
    for family in families:
        name = family.name + suffix[family.type]  # the series Prometheus stores
        assert re.search(rf"\b{re.escape(name)}\b", exprs), name
    # the page links a copy of the dashboard, beside it
    _, page = _page(rendered)
    copy = rendered.out / "grafana-streamstars.json"
    assert "grafana-streamstars.json" in page.links
    assert json.loads(copy.read_text()) == dashboard


# ------------------------------------------------------------------------------ browser
def test_page_in_headless_chromium(rendered: Rendered, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (scripts/test.sh does "
                    "when apt-get is available) to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (test extra)")
    messages: list[tuple[str, str]] = []
    failed: list[str] = []
    profile = tmp_path / "profile"
    profile.mkdir()
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1200, "height": 900})
        try:
            page = context.new_page()
            page.on("console", lambda m: messages.append((m.type, m.text)))
            page.on("pageerror", lambda e: messages.append(("pageerror", str(e))))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto((rendered.out / "index.html").as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map("
                                   "i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
            title = page.title()
            page.screenshot(path=str(tmp_path / "page.png"), full_page=False)
            page.goto("about:blank")
            page.screenshot(path=str(tmp_path / "blank.png"))
        finally:
            context.close()
    assert title == "streamstars report"
    assert [m for m in messages if m[0] in ("error", "pageerror", "warning")] == []
    assert failed == []
    assert len(images) == 10 and all(complete and width > 0 for _, complete, width in images), \
        images
    shot, blank = imread(tmp_path / "page.png"), imread(tmp_path / "blank.png")
    assert shot.shape == blank.shape
    differs = np.any(np.abs(shot[..., :3] - blank[..., :3]) > 0.1, axis=2)
    assert differs.mean() > 0.05, "the screenshot is (nearly) blank"
    assert len(np.unique(shot.reshape(-1, shot.shape[2]), axis=0)) > 100

