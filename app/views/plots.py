"""Live plots (pyqtgraph): rolling tau with topic bands and updater switches, per-position
acceptance, ensemble weights (stacked) with step sizes, online loss, tokens/s and speedup.
All x axes are tokens generated (aligned across compared configurations)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyqtgraph as pg
from pyqtgraph.exporters import ImageExporter
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..records import RunLog

pg.setConfigOptions(background="w", foreground="k", antialias=False)  # curves opt in

CONFIG_COLORS = ["#0072B2", "#E69F00", "#CC79A7"]  # Okabe-Ito: blue, orange, reddish purple
EXPERT_COLORS = ["#56B4E9", "#009E73", "#F0E442", "#D55E00", "#CC79A7", "#999999"]
W_POINTS = 600  # points per stacked weight curve (the plot is a few hundred pixels wide)
TOPIC_BRUSHES = ["#E8F1FA", "#FBEFE0", "#EAF6EF", "#F6E9F2", "#F4F4E2"]
X_LABEL = "tokens generated"


def _arr(v: list[float]) -> np.ndarray:
    return np.asarray(v, dtype=float)


class PlotsView(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.glw = pg.GraphicsLayoutWidget(self)
        self.legend = QLabel(self)
        self.legend.setObjectName("plot_legend")
        self.legend.setStyleSheet("background: white; padding: 2px 6px;")
        self.legend.setWordWrap(True)
        self.readout = QLabel(self)  # the run's numbers (tau, tokens/s, speedup) in plain sight
        self.readout.setObjectName("plot_readout")
        self.readout.setStyleSheet("background: white; padding: 0px 6px 2px 6px; color: #222222;")
        self.readout.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addWidget(self.legend)
        lay.addWidget(self.readout)
        lay.addWidget(self.glw, 1)
        g = self.glw
        self.p_tau = self._plot(0, 0, "Rolling acceptance length \u03c4", "\u03c4")
        self.p_pos = self._plot(0, 1, "Acceptance by draft position", "rate", x="position i")
        self.p_w = self._plot(0, 2, "Ensemble weights (stacked)", "weight")
        self.p_loss = self._plot(1, 0, "Online loss (rolling)", "loss")
        self.p_speed = self._plot(1, 1, "Throughput (rolling)", "tokens/s")
        self.p_up = self._plot(1, 2, "Speedup vs target-only", "\u00d7")
        self.p_pos.setYRange(0, 1.05)
        for p in (self.p_w, self.p_loss, self.p_speed, self.p_up):
            p.setXLink(self.p_tau)  # one token axis for every time plot
        self.p_w.setYRange(0, 1.0)
        g.ci.layout.setSpacing(4)
        self._topic_items: list = []
        self._switch_items: list = []
        self._w_items: list = []
        self._baseline_line = None
        self.reset(["run"])

    def _plot(self, row: int, col: int, title: str, y: str, x: str = X_LABEL) -> pg.PlotItem:
        p = self.glw.addPlot(row=row, col=col, title=f"<span style='font-size:10pt'>{title}</span>")
        p.setLabel("left", y)
        p.setLabel("bottom", x)
        p.showGrid(x=False, y=False)
        p.setMenuEnabled(False)
        p.getAxis("left").enableAutoSIPrefix(False)
        p.getAxis("bottom").enableAutoSIPrefix(False)
        return p

    def reset(self, names: list[str], shared: bool = False) -> None:
        """shared: configs after the first replay the target's recorded pass (compare mode), so
        their tokens/s leaves most target time out: their speed curves say so and are dashed."""
        for p in (self.p_tau, self.p_pos, self.p_w, self.p_loss, self.p_speed, self.p_up):
            p.clear()
            if p.legend is not None:
                p.legend.scene().removeItem(p.legend) if p.legend.scene() else None
                p.legend = None
        self.names = list(names)
        self.shared = shared
        self.labels = list(names)
        self._baseline_text = ""
        self._topic_items, self._switch_items, self._w_items = [], [], []
        self._n_topics = self._n_switches = 0
        self._baseline_line = None
        self._baseline_pos = None
        self._w_k = 0
        self._xlim = 0.0
        self._update_legend()
        self.legend.setToolTip("In compare mode the configurations marked 'target replayed' reuse "
                               "the target's recorded greedy pass: their speed is not measured (no "
                               "throughput or speedup curve); compare their \u03c4, acceptance and "
                               "loss, which are exact." if shared else "")
        self.c_tau, self.c_loss, self.c_speed, self.c_up, self.bars = [], [], [], [], []
        for i, n in enumerate(self.names):
            col = CONFIG_COLORS[i % len(CONFIG_COLORS)]
            pen = pg.mkPen(col, width=2)
            self.c_tau.append(self._curve(self.p_tau, pen, n))
            self.c_loss.append(self._curve(self.p_loss, pen, n))
            bars = pg.BarGraphItem(x=[], height=[], width=0.8 / len(self.names), brush=col, name=n)
            self.p_pos.addItem(bars)
            self.bars.append(bars)
            if shared and i > 0:  # replayed: its tokens/s is not a speed; no curve at all
                self.c_speed.append(None)
                self.c_up.append(None)
                continue
            self.c_speed.append(self._curve(self.p_speed, pen, n))
            self.c_up.append(self._curve(self.p_up, pen, n))
        one = pg.InfiniteLine(pos=1.0, angle=0, pen=pg.mkPen("#777777", style=Qt.PenStyle.DashLine))
        self.p_up.addItem(one)
        self.p_w.setTitle("<span style='font-size:10pt'>Ensemble weights (stacked)</span> "
                          "<span style='font-size:8pt; color:#777777'>&mdash; ensemble updater only</span>")

    def replayed(self, i: int) -> bool:
        return self.shared and i > 0

    def set_labels(self, labels: list[str]) -> None:
        """New names for the configs (a live switch: 'frozen \u2192 ogd')."""
        self.labels = list(labels) + self.names[len(labels):]
        self._update_legend()

    def _update_legend(self) -> None:
        if self.names == ["run"]:  # no run yet
            self.legend.setText("<span style='color:#555555'>Start (Space) runs the setup on the left; "
                                "the curves of each configuration appear here.</span>")
            return
        keys = []  # one legend for all plots, above them: nothing covers a curve
        for i, n in enumerate(self.labels):
            col = CONFIG_COLORS[i % len(CONFIG_COLORS)]
            keys.append(f"<span style='color:{col}; font-weight:bold'>\u2501\u2501</span>&nbsp;{_html(n)}"
                        + (" <i>(target replayed: \u03c4 only, no speed)</i>" if self.replayed(i) else ""))
        keys.append("<span style='color:#444444'>- - -</span>&nbsp;target-only"
                    + (f" {self._baseline_text}" if self._baseline_text else " / 1\u00d7"))
        self.legend.setText("&nbsp;&nbsp;&nbsp;".join(keys))

    def _curve(self, plot: pg.PlotItem, pen, name: str) -> pg.PlotDataItem:
        c = plot.plot([], [], pen=pen, name=name, connect="finite", antialias=False)  # aa: 5x the paint time
        c.setDownsampling(auto=True, method="peak")
        c.setClipToView(True)
        return c

    # ---- refresh from the run log (the window calls this at a few Hz) --------------------
    def refresh(self, log: RunLog, group: int | None = None) -> None:
        """Update the curves. group 0 = tau/position/weights, 1 = loss/speed/speedup, None =
        all: the window alternates groups so each repaint covers half the plots."""
        top, bottom = group in (None, 0), group in (None, 1)
        xmax = max((s.tokens for s in log.series), default=0)
        for i, s in enumerate(log.series[: len(self.names)]):
            x = s.x.view()
            if top:
                self.c_tau[i].setData(x, s.tau.view())
                acc = s.per_position
                if acc:
                    n = len(self.names)
                    off = (i - (n - 1) / 2) * 0.8 / n
                    self.bars[i].setOpts(x=np.arange(1, len(acc) + 1) + off, height=acc)
            if bottom:
                self.c_loss[i].setData(x, s.loss.view())
                if self.c_speed[i] is not None:
                    self.c_speed[i].setData(x, s.tok_s.view())
                    if log.baseline_tok_s:  # never above the rolling tau: a round costs >= 1 target step
                        self.c_up[i].setData(x, np.minimum(s.tok_s.view() / log.baseline_tok_s, s.tau.view()))
        if xmax > self._xlim:  # x in steps (x1.5): axes repaint rarely; linked plots follow
            self._xlim = max(16.0, xmax * 1.5)
            self.p_tau.setXRange(0, self._xlim, padding=0.02)
        if top:
            self._topics(log)
            self._switches(log)
            self._weights(log)
        elif bottom:
            self._topics(log)
        if log.baseline_tok_s and self._baseline_pos != log.baseline_tok_s:
            # the line carries no label (it sat on the curve): the legend above says the number
            if self._baseline_line is None:
                pen = pg.mkPen("#444444", width=1.5, style=Qt.PenStyle.DashLine)
                self._baseline_line = pg.InfiniteLine(pos=log.baseline_tok_s, angle=0, pen=pen)
                self.p_speed.addItem(self._baseline_line)
            self._baseline_line.setValue(log.baseline_tok_s)
            self._baseline_pos = log.baseline_tok_s
            lo, hi = log.baseline_spread or (log.baseline_tok_s, log.baseline_tok_s)
            n = len(log.baseline_samples)
            self._baseline_text = (f"{log.baseline_tok_s:.0f} tok/s (median of {n}"
                                   + (f", {lo:.0f}\u2013{hi:.0f}" if n > 1 else "") + ") = 1\u00d7")
            self._update_legend()

    def _topics(self, log: RunLog) -> None:
        """Shade each topic's span in the tau and loss plots; label it at the top."""
        end = max((s.tokens for s in log.series), default=0)
        spans = [(x0, (log.topics[j + 1][0] if j + 1 < len(log.topics) else None), t)
                 for j, (x0, t) in enumerate(log.topics)]
        colors: dict[str, str] = {}
        for j, (x0, x1, t) in enumerate(spans):
            colors.setdefault(t, TOPIC_BRUSHES[len(colors) % len(TOPIC_BRUSHES)])
            if j < self._n_topics:
                continue
            items = []
            for p in (self.p_tau, self.p_loss):
                r = pg.LinearRegionItem(values=(x0, x1 or max(end, x0 + 1)), movable=False,
                                        brush=pg.mkBrush(colors[t]), pen=pg.mkPen(None))
                r.setZValue(-100)
                p.addItem(r)
                items.append(r)
            label = pg.TextItem(t, color="#555555", anchor=(0, 0), fill=(255, 255, 255, 170))
            label.setZValue(50)  # above the curves: a name under a curve was unreadable
            self.p_tau.addItem(label, ignoreBounds=True)
            items.append(label)
            self._topic_items.append((items, x0))
        self._n_topics = len(spans)
        if self._topic_items:  # the open span grows with the run; labels stay at the top
            items, x0 = self._topic_items[-1]
            for r in items[:2]:
                r.setRegion((x0, max(end, x0 + 1)))
        (x_lo, x_hi), (y0, y1) = self.p_tau.viewRange()
        for j, (items, x0) in enumerate(self._topic_items):  # alternate rows: short spans never collide
            near_right = x0 > x_lo + 0.8 * (x_hi - x_lo)  # would run past the right edge: end at x0
            items[2].setAnchor((1, 0) if near_right else (0, 0))
            items[2].setPos(x0, y1 - (j % 2) * 0.13 * (y1 - y0))

    def _switches(self, log: RunLog) -> None:
        for j, (x, a, b) in enumerate(log.switches[self._n_switches:], start=self._n_switches):
            # low in the plot (topic labels live at the top), alternating rows for close switches
            line = pg.InfiniteLine(pos=x, angle=90, pen=pg.mkPen("#D55E00", width=2, style=Qt.PenStyle.DashLine),
                                   label=f"\u2192 {b}", labelOpts={"position": 0.08 + 0.12 * (j % 3),
                                                                   "color": "#D55E00", "anchors": [(0, 1), (0, 1)],
                                                                   "fill": (255, 255, 255, 200)})
            self.p_tau.addItem(line)
            self._switch_items.append(line)
        self._n_switches = len(log.switches)

    def _weights(self, log: RunLog) -> None:
        """Stacked expert weights: one filled curve per cumulative sum, drawn from the top layer
        down (each fills to 0 over the previous), at most W_POINTS points: no FillBetweenItem,
        whose path rebuild on every setData grew with the run (the UI stalls of long runs)."""
        s = next((s for s in log.series if s.weights), None)
        if s is None:
            return
        kk = len(s.weights[-1])
        step = max(1, len(s.weights) // W_POINTS)
        idx = [i for i in range(len(s.weights) - 1, -1, -step) if len(s.weights[i]) == kk][::-1]
        w = np.asarray([s.weights[i] for i in idx], dtype=float)
        x = _arr([s.weights_x[i] for i in idx])
        k = w.shape[1]
        if k != self._w_k:
            for it in self._w_items:
                self.p_w.removeItem(it)
            self._w_items, self._w_curves = [], []
            for j in range(k):
                col = EXPERT_COLORS[j % len(EXPERT_COLORS)]
                c = self.p_w.plot([], [], pen=pg.mkPen("#333333", width=0.8), fillLevel=0.0,
                                  brush=pg.mkBrush(col))
                c.setZValue(-j)  # expert 0's layer on top, the full stack at the back
                self._w_curves.append(c)
                self._w_items.append(c)
            self._w_k = k
        cum = np.cumsum(w, axis=1)
        for j in range(k):
            self._w_curves[j].setData(x, cum[:, j])
        keys = []  # legend in the title: one coloured square per expert with its step size
        for j in range(k):
            lr = s.step_sizes[j] if j < len(s.step_sizes) else None
            col = EXPERT_COLORS[j % len(EXPERT_COLORS)]
            name = f"e{j + 1}" if lr is None else ("0 (offline)" if lr == 0 else f"{lr:.0e}")
            keys.append(f"<span style='color:{col}'>\u25a0</span>" + name)
        self.p_w.setTitle(f"<span style='font-size:10pt'>Ensemble weights</span> "
                          f"<span style='font-size:8pt'>\u03b7: {' '.join(keys)}</span>")

    def export_png(self, path: str | Path, width: int = 1800) -> Path:
        ex = ImageExporter(self.glw.ci)
        ex.parameters()["width"] = width
        ex.export(str(path))
        return Path(path)


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


