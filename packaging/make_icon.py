"""Draw the app icon: assets/icons/onlinespec.svg and a 256 px PNG rendered from it.

    python packaging/make_icon.py
Three token chips (accepted draft tokens in bluish green, a bonus token in blue: the token
view's palette) under a rising acceptance curve, on a dark rounded square.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256" viewBox="0 0 256 256">
  <defs>
    <linearGradient id="bg" x1="0" y1="0" x2="0" y2="1">
      <stop offset="0" stop-color="#1d3557"/><stop offset="1" stop-color="#0b1a2e"/>
    </linearGradient>
  </defs>
  <rect x="8" y="8" width="240" height="240" rx="44" fill="url(#bg)"/>
  <path d="M40 150 C 90 146, 120 120, 150 92 S 200 52, 218 46" fill="none" stroke="#E69F00"
        stroke-width="12" stroke-linecap="round"/>
  <circle cx="218" cy="46" r="11" fill="#E69F00"/>
  <rect x="36" y="176" width="52" height="40" rx="8" fill="#009E73"/>
  <rect x="98" y="176" width="52" height="40" rx="8" fill="#009E73"/>
  <rect x="160" y="176" width="60" height="40" rx="8" fill="#56B4E9"/>
  <rect x="46" y="190" width="32" height="8" rx="4" fill="#E8F6F0"/>
  <rect x="108" y="190" width="32" height="8" rx="4" fill="#E8F6F0"/>
  <rect x="170" y="190" width="40" height="8" rx="4" fill="#EAF4FB"/>
</svg>
"""


def main() -> int:
    out = ROOT / "assets" / "icons"
    out.mkdir(parents=True, exist_ok=True)
    (out / "onlinespec.svg").write_text(SVG, encoding="utf-8")
    from PySide6.QtCore import QByteArray, Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer
    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1] + ["-platform", "offscreen"])
    for size in (256, 64):
        img = QImage(size, size, QImage.Format.Format_ARGB32)
        img.fill(Qt.GlobalColor.transparent)
        p = QPainter(img)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        QSvgRenderer(QByteArray(SVG.encode())).render(p)
        p.end()
        name = "onlinespec.png" if size == 256 else f"onlinespec-{size}.png"
        img.save(str(out / name))
    del app
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
