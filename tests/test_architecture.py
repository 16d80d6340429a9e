"""The README's "Architecture" section is what the imports do: every module sits in one layer
and imports only its own layer or those above; onlinespec_core never imports Qt; the section
names every module."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "onlinespec_core"
# the README's table, top to bottom (a module matches its longest listed prefix)
LAYERS = {
    "base": ["errors", "paths", "atomic", "sampling", "options"],
    "algorithms": ["feedback", "metrics", "kpolicy", "fast", "decoding", "drafts", "updaters", "models",
                   "training", "streams", "demo"],
    "engine": ["driver", "engine", "state", "compare"],
    "users": ["runner", "bench", "costs", "export", "cli", "plots_png", "studies", "__init__"],
}
ORDER = list(LAYERS)


def module_name(p: Path) -> str:
    parts = list(p.relative_to(CORE).with_suffix("").parts)
    return ".".join(parts) if parts != ["__init__"] else "__init__"


def layer_of(mod: str) -> str:
    best, layer = -1, None
    for name, prefixes in LAYERS.items():
        for pre in prefixes:
            if (mod == pre or mod.startswith(pre + ".")) and len(pre) > best:
                best, layer = len(pre), name
    assert layer is not None, f"onlinespec_core.{mod} is in no layer: add it to the README's Architecture table and LAYERS"
    return layer


def internal_imports(p: Path) -> set[str]:
    """onlinespec_core modules p imports (function-level too; not under TYPE_CHECKING)."""
    mod = module_name(p)
    pkg = mod.split(".")[:-1] if p.name != "__init__.py" else mod.split(".")
    if mod == "__init__":
        pkg = []
    tree = ast.parse(p.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
            if node.module:
                out.add(".".join(base + [node.module]))
            else:
                out.update(".".join(base + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("onlinespec_core"):
            out.add(node.module[len("onlinespec_core."):] if node.module != "onlinespec_core" else "__init__")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "onlinespec_core":
                    out.add("__init__")
                elif a.name.startswith("onlinespec_core."):
                    out.add(a.name[len("onlinespec_core."):])
    return {m for m in out if m and m != mod}


def test_every_import_goes_up_the_layers():
    bad = []
    for p in sorted(CORE.rglob("*.py")):
        mod = module_name(p)
        mine = ORDER.index(layer_of(mod))
        for dep in internal_imports(p):
            if ORDER.index(layer_of(dep)) > mine:
                bad.append(f"{mod} ({layer_of(mod)}) imports {dep} ({layer_of(dep)})")
    assert not bad, "\n".join(bad)


def test_core_never_imports_qt():
    mods = [f"onlinespec_core.{module_name(p)}" for p in sorted(CORE.rglob("*.py"))
            if module_name(p) != "__init__"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods)
            + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'app'))\n"
            + "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_readme_architecture_names_every_module():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Architecture"):]
    section = section[: section.index("\n## ")]
    named = set(re.findall(r"`([a-z_]+)[/`]", section))
    for p in sorted(CORE.glob("*.py")):
        if p.stem != "__init__":
            assert p.stem in named, f"onlinespec_core/{p.name} is not in the README's Architecture section"
    for d in sorted(x for x in CORE.iterdir() if x.is_dir() and (x / "__init__.py").exists()):
        assert d.name in named, f"onlinespec_core/{d.name}/ is not in the README's Architecture section"
