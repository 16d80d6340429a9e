"""Token view: every emitted token coloured by origin, round boundaries, hover details.

Scales to long runs: tokens are appended in batches with one cursor (no relayout of what is
already there), undo is off, blocks are capped in length, and past MAX_TOKENS the oldest
blocks are dropped (their hover data too).
"""
from __future__ import annotations

from bisect import bisect_right
from typing import NamedTuple

from PySide6.QtCore import QEvent, QObject
from PySide6.QtGui import QBrush, QColor, QFont, QFontDatabase, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QPlainTextEdit, QToolTip, QVBoxLayout,
                               QWidget)


# Okabe-Ito hues (colour-blind safe), lightened for dark text; style adds a second cue
PALETTE: dict[str, tuple[str, str, str]] = {  # origin -> (background, text, legend label)
    "draft": ("#BFE6D6", "#00402E", "accepted draft token"),
    "correction": ("#F7C6A3", "#6B2600", "target correction (draft rejected)"),
    "bonus": ("#B4D6F0", "#00365A", "bonus token (all k accepted)"),
    "target": ("#E0E0E0", "#303030", "target-only"),
}
SEP_COLOR = "#9A9A9A"
MAX_TOKENS = 40_000  # tokens kept in the view; older blocks are dropped
TRIM = 10_000  # drop at least this many tokens at a time
MAX_BLOCK = 2_000  # characters before a forced line break (long single-line outputs)


class TokenInfo(NamedTuple):  # a tuple of atomics: untracked by the GC (100k of them)
    start: int  # absolute character position (never shifts when old blocks are dropped)
    length: int
    round: int
    origin: str
    token: str
    draft_p: float | None
    target_p: float | None
    drafted: str | None  # what the draft proposed at this position (differs at a correction)


def display(text: str) -> str:
    return text.replace("\n", "\u21b5\n").replace("\t", "\u2192   ") or "\u2205"


class TokenView(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.text = QPlainTextEdit(self)
        self.text.setReadOnly(True)
        self.text.setUndoRedoEnabled(False)
        self.text.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        font = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
        font.setPointSize(max(font.pointSize(), 10))
        self.text.setFont(font)
        self.text.viewport().installEventFilter(self)
        self.text.setMouseTracking(True)
        self.legend = QWidget(self)
        lay = QHBoxLayout(self.legend)
        lay.setContentsMargins(2, 0, 2, 0)
        for origin, (bg, fg, label) in PALETTE.items():
            chip = QLabel(f" {label} ", self.legend)
            chip.setObjectName(f"legend_{origin}")
            extra = "text-decoration: underline;" if origin == "correction" else \
                ("font-weight: bold;" if origin == "bonus" else "")
            chip.setStyleSheet(f"background:{bg}; color:{fg}; border-radius:3px; padding:1px 4px;{extra}")
            lay.addWidget(chip)
        sep = QLabel("<span style='color:%s'>|</span> round boundary" % SEP_COLOR, self.legend)
        lay.addWidget(sep)
        lay.addStretch(1)
        v = QVBoxLayout(self)
        v.setContentsMargins(0, 0, 0, 0)
        v.addWidget(self.legend)
        v.addWidget(self.text, 1)
        self._formats = {o: self._fmt(o) for o in PALETTE}
        self._sep = QTextCharFormat()
        self._sep.setForeground(QBrush(QColor(SEP_COLOR)))
        self._header = QTextCharFormat()
        self._header.setForeground(QBrush(QColor("#555555")))
        self._header.setFontItalic(True)
        self.clear()

    def _fmt(self, origin: str) -> QTextCharFormat:
        bg, fg, _ = PALETTE[origin]
        f = QTextCharFormat()
        f.setBackground(QBrush(QColor(bg)))
        f.setForeground(QBrush(QColor(fg)))
        if origin == "correction":
            f.setFontUnderline(True)
        elif origin == "bonus":
            f.setFontWeight(QFont.Weight.Bold)
        return f

    # ---- content -----------------------------------------------------------------------
    def clear(self) -> None:
        self.text.clear()
        self.infos: list[TokenInfo] = []
        self._starts: list[int] = []
        self._removed = 0  # characters dropped from the top so far
        self.n_tokens = 0  # tokens ever appended
        self._block_len = 0

    def _cursor(self) -> QTextCursor:
        c = QTextCursor(self.text.document())
        c.movePosition(QTextCursor.MoveOperation.End)
        return c

    def append(self, items: list[tuple[str, dict]]) -> None:
        """items: ('prompt', {topic, prompt_index, prompt}) or ('round', round-data) in order."""
        if not items:
            return
        bar = self.text.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 4
        if at_end and QToolTip.isVisible():
            QToolTip.hideText()  # the text under it is about to scroll: a stale tooltip misleads
        c = self._cursor()
        c.beginEditBlock()
        for kind, d in items:
            if kind == "prompt":
                self._prompt(c, d)
            else:
                self._round(c, d)
        c.endEditBlock()
        if self.n_tokens - self._first_token() > MAX_TOKENS + TRIM:
            self._trim()
        if at_end:
            bar.setValue(bar.maximum())

    def _prompt(self, c: QTextCursor, d: dict) -> None:
        if self.text.document().characterCount() > 1:
            c.insertBlock()
        topic = d.get("topic") or ""
        idx = d.get("prompt_index")
        head = f"\u25b6 prompt {idx if idx is not None else ''} [{topic}]"
        if d.get("prompt"):
            head += " " + d["prompt"].replace("\n", " ")[:200]
        c.insertText(head, self._header)
        c.insertBlock()
        self._block_len = 0

    def _round(self, c: QTextCursor, d: dict) -> None:
        texts, kinds = d["texts"], d["origins"]  # origins: the round's own (feedback.Round.origins)
        dp, tp = d.get("draft_p") or [], d.get("target_p") or []
        dtexts = d.get("drafted_texts") or []
        for i, (tok, origin) in enumerate(zip(texts, kinds)):
            shown = display(tok)
            start = c.position() + self._removed
            c.insertText(shown, self._formats[origin])
            self.infos.append(TokenInfo(start, len(shown), d["round"], origin, tok,
                                        dp[i] if i < len(dp) else None,
                                        tp[i] if i < len(tp) else None,
                                        dtexts[i] if i < len(dtexts) else None))
            self._starts.append(start)
            self.n_tokens += 1
            self._block_len = 0 if "\n" in shown else self._block_len + len(shown)
        c.insertText("|", self._sep)  # round boundary
        self._block_len += 1
        if self._block_len > MAX_BLOCK:
            c.insertBlock()
            self._block_len = 0

    def _first_token(self) -> int:
        return self.n_tokens - len(self.infos)

    def _trim(self) -> None:
        """Drop whole blocks from the top until at least TRIM tokens are gone."""
        doc = self.text.document()
        target = self.infos[TRIM].start - self._removed
        block = doc.findBlock(target)
        cut = block.position()
        if cut <= 0:
            return
        c = QTextCursor(doc)
        c.setPosition(0)
        c.setPosition(cut, QTextCursor.MoveMode.KeepAnchor)
        c.removeSelectedText()
        self._removed += cut
        drop = bisect_right(self._starts, self._removed - 1)
        del self.infos[:drop]
        del self._starts[:drop]

    # ---- hover -------------------------------------------------------------------------
    def token_at(self, doc_pos: int) -> TokenInfo | None:
        p = doc_pos + self._removed
        i = bisect_right(self._starts, p) - 1
        if i < 0:
            return None
        info = self.infos[i]
        return info if p < info.start + info.length else None

    def tooltip_for(self, info: TokenInfo) -> str:
        label = PALETTE[info.origin][2]
        lines = [f"<b>{_esc(info.token)!s}</b> &mdash; {label}", f"round {info.round}"]
        if info.origin == "correction" and info.drafted is not None:
            # quoted and with visible whitespace: a proposed "|" must not read as a round boundary
            lines.append(f"the draft had proposed \u201c<b>{_esc(display(info.drafted))}</b>\u201d (rejected)")
        if info.draft_p is not None:
            lines.append(f"draft prob q = {info.draft_p:.3f}")
        if info.target_p is not None:
            lines.append(f"target prob p = {info.target_p:.3f}")
        return "<br>".join(lines)

    def eventFilter(self, obj: QObject, ev: QEvent) -> bool:  # noqa: N802 (Qt API)
        if ev.type() == QEvent.Type.ToolTip and obj is self.text.viewport():
            pos = ev.pos()
            info = self.token_at(self.text.cursorForPosition(pos).position())
            if info is None:
                cur = self.text.cursorForPosition(pos).position() - 1
                info = self.token_at(cur) if cur >= 0 else None
            if info is not None:
                QToolTip.showText(ev.globalPos(), self.tooltip_for(info), self.text.viewport())
            else:
                QToolTip.hideText()
            return True
        return super().eventFilter(obj, ev)


def _esc(s: str | None) -> str:
    s = repr(s)[1:-1] if s is not None else ""
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
