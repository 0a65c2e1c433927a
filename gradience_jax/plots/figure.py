"""The one figure helper of ``gradience_jax.plots``: a canvas, a save, a style.

Figures are drawn on an Agg canvas without touching pyplot's global state (notebooks keep
their backend); matplotlib is imported inside the functions, so importing this module does
not import it.

Supported names: ``DPI`` (the one resolution of every PNG this package writes),
``new_figure``, ``save_figure``, ``require_result`` (the "figures never train" check),
``TITLE`` (axes-title style), ``RUN_COLORS`` (colours of runs / heads) and ``no_data``
(a placeholder text on an empty axes).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DPI", "RUN_COLORS", "TITLE", "new_figure", "no_data", "require_result", "save_figure"]

#: Resolution (dots per inch) of every PNG written by the figures, protocols and reports.
DPI = 110
#: Keyword arguments of ``ax.set_title`` for panel titles.
TITLE = {"fontsize": 10, "fontweight": "bold"}
#: Colours of runs (or heads), cycled in order.
RUN_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def new_figure(figsize: tuple[float, float], *, layout: str | None = "constrained") -> Any:
    """A ``matplotlib.figure.Figure`` on its own Agg canvas (pyplot state untouched).

    Args:
        figsize: ``(width, height)`` in inches.
        layout: matplotlib layout engine (default ``"constrained"``; None: none).

    Returns:
        The figure, ready for ``add_subplot`` / ``subplots`` and :func:`save_figure`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional dep
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional dependency

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike | None, *, dpi: int = DPI) -> str | None:
    """Write ``fig`` as an image at ``path`` (format from the suffix, PNG by default).

    Missing parent folders are created; ``path=None`` writes nothing.

    Args:
        fig: a matplotlib figure (e.g. from :func:`new_figure`).
        path: the file to write, or None.
        dpi: resolution; every figure of the package uses :data:`DPI`.

    Returns:
        ``str(path)``, or None when nothing was written.
    """
    if path is None:
        return None
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return str(path)


def require_result(result: Any, figure: str, experiment: str) -> Any:
    """Check that a figure was given its result: figures never run their experiment.

    Args:
        result: what the caller passed as ``result``.
        figure: the figure function's name (for the message).
        experiment: the dotted name of the experiment that produces the result.

    Returns:
        ``result`` unchanged (any object with the result's attributes is accepted).

    Raises:
        TypeError: ``result`` is None; the message names the argument and the experiment.
    """
    if result is None:
        raise TypeError(f"{figure}() needs result=: figures draw results and never train; "
                        f"run {experiment}(...) and pass what it returns")
    return result


def no_data(ax: Any, what: str = "no finite values") -> None:
    """Write ``what`` in the middle of ``ax`` (2-D or 3-D axes) in grey.

    Args:
        ax: a matplotlib axes.
        what: the text.
    """
    text = getattr(ax, "text2D", ax.text)  # 3-D axes place 2-D text with text2D
    text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4")
