"""Bundled offline models (filled in by the zoo training script)."""
from __future__ import annotations

from pathlib import Path
from typing import List

WEIGHTS_DIR = Path(__file__).parent / "weights"


def available() -> List[str]:
    """Names of the bundled models whose weights are present."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").is_file())


def load(name: str, device: str = "cpu"):
    raise NotImplementedError("the bundled models are not trained yet")
