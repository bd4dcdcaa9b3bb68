"""The report's HTML page: ``OUT/index.html`` with its PNGs in ``OUT/plots/``.

The page needs nothing but the files beside it: no script, no stylesheet or font from the
network, images referenced by relative paths.  Every text that comes from data is escaped.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streamstars.report.plotting import Plot
from streamstars.report.trends import Outlier

__all__ = ["PLOTS_DIR", "DashboardLink", "PlotImage", "Section", "clear_plots", "render_page",
           "save_plot", "write_page"]

#: Sub-directory of the output directory holding the PNGs.
PLOTS_DIR = "plots"
#: Resolution of the PNGs [dots per inch].
DPI = 90

_STYLE = """
body { font-family: sans-serif; margin: 0 auto; max-width: 1150px; padding: 0 1.5em 3em;
       color: #222; background: #fff; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.provenance th { width: 13em; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; max-width: 60em; margin-top: 0.4em; }
nav a { margin-right: 1em; }
p.note { color: #555; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


@dataclass(frozen=True)
class PlotImage:
    """A PNG written for the page: ``src`` is relative to the page."""

    name: str
    title: str
    caption: str
    src: str
    width: int
    height: int


@dataclass
class Section:
    """A section of the page: a heading, an introduction and its images."""

    anchor: str
    title: str
    intro: str
    images: list[PlotImage] = field(default_factory=list)


@dataclass(frozen=True)
class DashboardLink:
    """Where the page points for the Kafka consumer's Grafana dashboard (``href`` empty: the
    dashboard is named, not linked)."""

    href: str
    text: str
    note: str


def clear_plots(out_dir: Path) -> None:
    """Remove the PNGs of an earlier report from ``out_dir/plots`` (only ``*.png``)."""
    for old in (out_dir / PLOTS_DIR).glob("*.png"):
        old.unlink()


def save_plot(plot: Plot, out_dir: Path) -> PlotImage:
    """Write ``plot`` as ``out_dir/plots/<name>.png`` and close its figure."""
    target = out_dir / PLOTS_DIR / f"{plot.name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    figure = plot.figure
    figure.savefig(target, dpi=DPI, format="png")
    width, height = (int(round(v * DPI)) for v in figure.get_size_inches())
    figure.clear()
    return PlotImage(plot.name, plot.title, plot.caption, f"{PLOTS_DIR}/{target.name}", width,
                     height)


def _outlier_table(outliers: Sequence[Outlier], threshold: float) -> str:
    if not outliers:
        return (f"<p class=\"note\" id=\"outliers\">No visit stands out (no quantity with "
                f"|robust z| &gt; {threshold:g} within its band).</p>")
    rows = "\n".join(
        f"<tr><td>{o.visit}</td><td>{html.escape(o.band)}</td><td>{o.mjd:.5f}</td>"
        f"<td>{html.escape(o.metric)}</td><td>{o.value:.4g}</td><td>{o.band_median:.4g}</td>"
        f"<td>{o.z:+.1f}</td><td>{html.escape(o.reason)}</td></tr>" for o in outliers)
    return (f"<table id=\"outliers\" class=\"outliers\">\n<caption>Visits that stand out: "
            f"|robust z| &gt; {threshold:g} within their band</caption>\n"
            "<tr><th>visit</th><th>band</th><th>MJD</th><th>quantity</th><th>value</th>"
            "<th>band median</th><th>robust z</th><th>reason</th></tr>\n"
            f"{rows}\n</table>")


def render_page(provenance: Sequence[tuple[str, str]], sections: Sequence[Section],
                outliers: Sequence[Outlier], threshold: float,
                dashboard: DashboardLink | None) -> str:
    """The HTML text of the page."""
    prov_rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                          for k, v in provenance)
    nav = " ".join(f"<a href=\"#{s.anchor}\">{html.escape(s.title)}</a>" for s in sections)
    parts = [
        "<!DOCTYPE html>",
        "<html lang=\"en\">",
        "<head>",
        "<meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        "<link rel=\"icon\" href=\"data:,\">",  # no favicon request
        "<title>streamstars report</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<header>",
        "<h1>streamstars catalog report</h1>",
        f"<table class=\"provenance\" id=\"provenance\">\n{prov_rows}\n</table>",
        f"<nav>{nav} <a href=\"#outliers\">Outlier visits</a>"
        + (" <a href=\"#monitoring\">Monitoring</a>" if dashboard else "") + "</nav>",
        "</header>",
    ]
    for section in sections:
        parts.append(f"<section id=\"{html.escape(section.anchor)}\">")
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.intro:
            parts.append(f"<p>{html.escape(section.intro)}</p>")
        for image in section.images:
            parts.append(
                f"<figure id=\"{html.escape(image.name)}\">"
                f"<img src=\"{html.escape(image.src)}\" alt=\"{html.escape(image.title)}\" "
                f"width=\"{image.width}\" height=\"{image.height}\">"
                f"<figcaption><b>{html.escape(image.title)}.</b> "
                f"{html.escape(image.caption)}</figcaption></figure>")
        if section.anchor == "trends":
            parts.append(_outlier_table(outliers, threshold))
        parts.append("</section>")
    if dashboard is not None:
        target = (f"<a id=\"grafana-dashboard\" href=\"{html.escape(dashboard.href)}\">"
                  f"{html.escape(dashboard.text)}</a>" if dashboard.href else
                  f"<code id=\"grafana-dashboard\">{html.escape(dashboard.text)}</code>")
        parts += [
            "<section id=\"monitoring\">",
            "<h2>Monitoring</h2>",
            "<p>The Kafka consumer (<code>streamstars run --metrics-port</code>) serves "
            "Prometheus metrics on <code>/metrics</code>; the Grafana dashboard "
            f"{target} charts them (visits applied, latency, "
            f"lag, snapshots, failures). {html.escape(dashboard.note)}</p>",
            "</section>",
        ]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def write_page(out_dir: Path, text: str) -> Path:
    """Write ``out_dir/index.html`` (through a temporary file renamed into place)."""
    target = out_dir / "index.html"
    tmp = out_dir / f".index.html.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target
