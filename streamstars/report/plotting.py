"""The optional plotting libraries and what every section hands to the page.

matplotlib (figures, PNG) and skyproj (HEALPix maps on sky projections; it brings healsparse
and hpgeom) are the ``streamstars[report]`` extra.  :func:`require_plotting` checks them once,
before any work, and names the extra when one is missing.  Figures are plain
:class:`matplotlib.figure.Figure` objects (no pyplot state), saved as PNG and closed by the
page writer.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamstars.errors import StreamstarsError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["BAND_COLOURS", "Plot", "ReportDependencyError", "band_colour", "new_figure",
           "no_data", "require_plotting"]

#: Plot colour of each band (other bands cycle through matplotlib's default colours).
BAND_COLOURS = {"u": "#7b3294", "g": "#1b9e77", "r": "#d62728", "i": "#ff7f0e",
                "z": "#404040", "y": "#8c564b"}
_OTHER_COLOURS = ("#1f77b4", "#e377c2", "#bcbd22", "#17becf", "#9467bd")
_REQUIRED = (("matplotlib", "matplotlib"), ("skyproj", "skyproj"))


class ReportDependencyError(StreamstarsError):
    """A plotting library of the ``streamstars[report]`` extra is not installed."""


@dataclass
class Plot:
    """One PNG of the page.

    Attributes:
        name: file stem of the PNG (``plots/<name>.png``) and HTML anchor.
        title: heading shown above the image.
        caption: what the plot shows and what to look for (plain text).
        figure: the matplotlib figure (closed once written).
    """

    name: str
    title: str
    caption: str
    figure: Figure


def require_plotting() -> None:
    """Import the plotting libraries of the ``report`` extra.

    Raises:
        ReportDependencyError: one is missing; the message says how to install it.
    """
    missing = []
    for module, package in _REQUIRED:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ReportDependencyError(
            f"streamstars report needs {', '.join(missing)}, which is not installed; install "
            "the report extra: pip install 'streamstars[report]'")


def new_figure(width_in: float, height_in: float, **margins: float) -> Figure:
    """A figure of the given size in inches, not registered with pyplot.

    ``margins``: :meth:`~matplotlib.figure.Figure.subplots_adjust` arguments.  Fixed margins
    rather than a layout engine: constrained layout recomputes every text extent at each draw
    and cost more than the plots themselves.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in))
    if margins:
        figure.subplots_adjust(**margins)
    return figure


def band_colour(band: str, index: int) -> str:
    """The plot colour of ``band`` (``index``: its position among the report's bands)."""
    return BAND_COLOURS.get(band, _OTHER_COLOURS[index % len(_OTHER_COLOURS)])


def no_data(ax: Any, message: str) -> None:
    """Mark an axes that has nothing to show (the message is written in its centre)."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9,
            color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])
