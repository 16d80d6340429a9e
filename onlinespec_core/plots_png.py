"""PNG plots for headless runs, drawn offscreen with pyqtgraph (Qt is imported lazily, inside
the functions, so `import onlinespec_core` never pulls in Qt)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

# fill colours (r, g, b, alpha) for the topic bands, and pens for series
BAND_COLOURS = [(66, 133, 244, 40), (234, 67, 53, 40), (52, 168, 83, 40), (251, 188, 5, 50),
                (171, 71, 188, 40), (0, 172, 193, 40)]
LINE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
                (140, 86, 75), (23, 190, 207), (127, 127, 127)]


def _pg():
    """pyqtgraph with a QApplication (offscreen when there is no display)."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import pyqtgraph as pg
    from pyqtgraph.Qt import QtWidgets
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    pg.setConfigOptions(antialias=True, background="w", foreground="k")
    return pg, app


def topic_spans(topics: Sequence[str | None]) -> list[tuple[int, int, str]]:
    """Runs of equal topic as (start, end_exclusive, topic) over round indices."""
    spans: list[tuple[int, int, str]] = []
    for i, t in enumerate(topics):
        name = "" if t is None else str(t)
        if spans and spans[-1][2] == name:
            spans[-1] = (spans[-1][0], i + 1, name)
        else:
            spans.append((i, i + 1, name))
    return spans


def rolling_mean(xs: Sequence[float], window: int) -> list[float]:
    """Mean of the last `window` values at each index (shorter at the start)."""
    out, s = [], 0.0
    for i, x in enumerate(xs):
        s += x
        if i >= window:
            s -= xs[i - window]
        out.append(s / min(i + 1, window))
    return out


def _bands(pg, plot, topics: Sequence[str | None], y_top: float) -> None:
    colour = {}
    for start, end, name in topic_spans(topics):
        c = colour.setdefault(name, BAND_COLOURS[len(colour) % len(BAND_COLOURS)])
        region = pg.LinearRegionItem((start - 0.5, end - 0.5), movable=False, brush=pg.mkBrush(*c),
                                     pen=pg.mkPen(None))
        region.setZValue(-10)
        plot.addItem(region)
        if name:
            label = pg.TextItem(name, color=(60, 60, 60), anchor=(0, 0))
            label.setPos(start, y_top)
            plot.addItem(label)


def _window(pg, size: tuple[int, int]):
    """A layout widget laid out at `size` without appearing on any screen."""
    from pyqtgraph.Qt import QtCore
    win = pg.GraphicsLayoutWidget(show=False)
    win.setAttribute(QtCore.Qt.WidgetAttribute.WA_DontShowOnScreen, True)
    win.resize(*size)
    win.show()
    return win


def _export(pg, app, widget, path: Path, width: int) -> Path:
    import pyqtgraph.exporters as exporters
    app.processEvents()
    ex = exporters.ImageExporter(widget.scene())
    ex.parameters()["width"] = width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ex.export(str(path))
    widget.close()
    widget.deleteLater()
    app.processEvents()
    return path


def tau_png(path: str | Path, taus: Sequence[float], topics: Sequence[str | None], window: int = 16,
            title: str = "tau per round", size: tuple[int, int] = (1000, 420)) -> Path:
    """tau of every round (dots), its rolling mean (line), topic bands behind."""
    pg, app = _pg()
    win = _window(pg, size)
    plot = win.addPlot(title=title)
    plot.setLabel("bottom", "round")
    plot.setLabel("left", "tau (tokens per target forward)")
    plot.showGrid(x=True, y=True, alpha=0.2)
    x = list(range(len(taus)))
    y_top = max(taus) + 0.6 if taus else 1.0
    _bands(pg, plot, topics, y_top)
    plot.plot(x, list(taus), pen=None, symbol="o", symbolSize=3, symbolBrush=(120, 120, 120, 90),
              symbolPen=None)
    plot.plot(x, rolling_mean(list(taus), window), pen=pg.mkPen(LINE_COLOURS[0], width=2),
              name=f"rolling mean ({window} rounds)")
    plot.setYRange(0.8, y_top + 0.2)
    plot.setXRange(-0.5, max(len(taus) - 0.5, 0.5), padding=0)
    return _export(pg, app, win, Path(path), size[0])


def weights_png(path: str | Path, rounds: Sequence[int], weights: Sequence[Sequence[float]],
                labels: Sequence[str], topics: Sequence[str | None], title: str = "ensemble weights",
                size: tuple[int, int] = (1000, 420)) -> Path:
    """One line per expert: its Hedge weight after each round; topic bands behind."""
    pg, app = _pg()
    win = _window(pg, size)
    plot = win.addPlot(title=title)
    plot.setLabel("bottom", "round")
    plot.setLabel("left", "weight")
    plot.showGrid(x=True, y=True, alpha=0.2)
    legend = plot.addLegend(offset=(-10, 5), colCount=3)  # one row, in the headroom above 1.0
    _bands(pg, plot, topics, 1.08)
    n = len(weights[0]) if weights else 0
    for i in range(n):
        plot.plot(list(rounds), [w[i] for w in weights], pen=pg.mkPen(LINE_COLOURS[i % len(LINE_COLOURS)], width=2),
                  name=labels[i] if i < len(labels) else f"expert {i}")
    legend.setZValue(10)
    plot.setYRange(0.0, 1.2)
    plot.setXRange(-0.5, max(len(topics) - 0.5, 0.5), padding=0)
    return _export(pg, app, win, Path(path), size[0])
