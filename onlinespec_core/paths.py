"""Where the bundled assets live (ONLINESPEC_ASSETS overrides): models, streams, plots."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("ONLINESPEC_ASSETS", REPO_ROOT / "assets"))
DEMO_DIR = ASSETS / "models" / "demo"
STREAMS_DIR = ASSETS / "streams"
