"""Entry point of `onlinespec-gui` and `onlinespec gui`.

    onlinespec gui                                   # the playground
    onlinespec gui --screenshot shot.png --rounds 60 # headless: run, grab the window, exit 0
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="onlinespec gui", description="OnlineSpec desktop playground")
    p.add_argument("--screenshot", metavar="FILE", help="run, grab the window to FILE (PNG) and exit")
    p.add_argument("--rounds", type=int, default=40, help="screenshot after this many rounds (default 40)")
    p.add_argument("--size", default="1280x800", help="window size WxH (default 1280x800)")
    p.add_argument("--target", help="target model dir or hub id (default: the demo pair)")
    p.add_argument("--draft", help="draft model dir or hub id")
    p.add_argument("--draft-kind", default="lm")
    p.add_argument("--stream", help="bundled stream name or JSONL file (default: the topic-shift stream)")
    p.add_argument("--updater", help="updater of the run (default: the remembered setting)")
    p.add_argument("--compare", nargs="*", default=None, metavar="UPDATER",
                   help="screenshot mode: compare with these updaters (up to two)")
    p.add_argument("--k", type=int)
    p.add_argument("--no-fast", action="store_true",
                   help="run the plain Hugging Face forward instead of the fast decode path (CPU)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--shift-every", type=int, default=0, metavar="N",
                   help="screenshot mode: press 'Shift topic' every N rounds (shows topic changes)")
    p.add_argument("--timeout", type=float, default=300.0, help="screenshot mode: give up after seconds")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Values the window's widgets would clamp or ignore are errors here (exit 2, with the fix)."""
    from onlinespec_core.engine import K_MAX, MAX_NEW_TOKENS
    from onlinespec_core.updaters import available_updaters
    names = available_updaters()
    if args.k is not None and not 0 <= args.k <= K_MAX:
        p.error(f"--k {args.k}: must be in 0..{K_MAX} (0 = target-only decoding)")
    top = min(MAX_NEW_TOKENS, 1_000_000)  # the window's spin box range
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens <= top:
        p.error(f"--max-new-tokens {args.max_new_tokens}: must be in 1..{top}")
    for name in ([args.updater] if args.updater else []) + [n for n in (args.compare or []) if n != "(none)"]:
        if name not in names:
            p.error(f"unknown updater {name!r}; choose one of {', '.join(names)}")
    if args.compare is not None and len(args.compare) > 2:
        p.error("--compare takes at most two updaters")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.screenshot and not os.environ.get("DISPLAY") and not os.environ.get("QT_QPA_PLATFORM"):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"  # headless machine
    import torch
    # leave a core to the UI thread: intra-op threads beyond that only contend on small models
    torch.set_num_threads(int(os.environ.get("ONLINESPEC_THREADS", max(1, (os.cpu_count() or 2) - 1))))
    from PySide6.QtCore import QSettings
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication

    from .window import MainWindow

    app = QApplication.instance() or QApplication([sys.argv[0]])
    app.setApplicationName("OnlineSpec Playground")
    app.setOrganizationName("OnlineSpec")
    icon = Path(__file__).resolve().parent.parent / "assets" / "icons" / "onlinespec.png"
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))
    settings = None
    if args.screenshot:  # reproducible: never read or write the user's settings
        tmp = tempfile.mkdtemp(prefix="onlinespec-shot-")
        settings = QSettings(str(Path(tmp) / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(settings)
    gc.collect()
    gc.freeze()  # torch/transformers/Qt import heaps: never walked by the collector again
    w, h = (int(v) for v in args.size.lower().split("x"))
    win.resize(w, h)
    _apply_args(win, args)
    win.show()
    if not args.screenshot:
        rc = app.exec()
        return int(rc)
    return screenshot(app, win, args)


def _apply_args(win, args: argparse.Namespace) -> None:
    s = win.setup
    if args.target:
        s.pair_source.setCurrentIndex(s.pair_source.findData("dirs"))
        s.target.setText(args.target)
        s.draft.setText(args.draft or "")
    s.draft_kind.setCurrentText(args.draft_kind)
    if args.stream:
        hit = [i for i in range(s.stream_kind.count()) if s.stream_kind.itemData(i) == ("bundled", args.stream)]
        if hit:
            s.stream_kind.setCurrentIndex(hit[0])
        else:
            s.stream_kind.setCurrentIndex(s.stream_kind.findText("JSONL file\u2026"))
            s.stream_file.setText(args.stream)
    if args.updater:
        s.updater.name.setCurrentText(args.updater)
    if args.compare is not None:
        for picker, name in zip((s.compare_b, s.compare_c), args.compare + ["(none)", "(none)"]):
            picker.name.setCurrentText(name)
    if args.no_fast:
        s.fast.setChecked(False)
    if args.k is not None:
        s.k.setValue(args.k)
    if args.max_new_tokens:
        s.max_new.setValue(args.max_new_tokens)


def screenshot(app, win, args: argparse.Namespace) -> int:
    """Start the default run, grab the window after N rounds, exit 0 (1: timeout, 2: error)."""
    from PySide6.QtCore import QEventLoop, QTimer

    result = {"rc": None, "shifted": 0}
    loop = QEventLoop()

    def check() -> None:
        if args.shift_every and win.rounds_seen >= (result["shifted"] + 1) * args.shift_every:
            result["shifted"] += 1
            win.shift_topic()
        if win.errors:
            print(f"error: {win.errors[-1]}", file=sys.stderr)
            result["rc"] = 2
        elif win.rounds_seen >= args.rounds or (win.state == "idle" and win.rounds_seen > 0):
            win.flush_tokens()
            win.refresh_plots(force=True)
            app.processEvents()
            win.refresh_plots(force=True)  # labels placed after the first layout pass
            app.processEvents()
            Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
            ok = win.grab().save(args.screenshot, "PNG")
            print(f"screenshot {args.screenshot}: {win.rounds_seen} rounds, "
                  f"UI stall max {win.max_stall_ms:.0f} ms")
            result["rc"] = 0 if ok else 2
        if result["rc"] is not None:
            loop.quit()

    poll = QTimer(interval=100, timeout=check)
    poll.start()
    QTimer.singleShot(int(args.timeout * 1000), loop.quit)
    QTimer.singleShot(300, win.start)
    loop.exec()
    poll.stop()
    if result["rc"] is None:
        print(f"error: no {args.rounds} rounds within {args.timeout:.0f} s", file=sys.stderr)
        result["rc"] = 1
    win.close()
    return int(result["rc"])


if __name__ == "__main__":
    raise SystemExit(main())
