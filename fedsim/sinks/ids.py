"""Which tracker runs a results folder reported to (``trackers.json``), so that a resumed
run, or a resumed sweep, continues the same MLflow and W&B runs instead of starting new ones."""

from __future__ import annotations

import json
from pathlib import Path

from fedsim.files import write_json

TRACKERS_JSON = "trackers.json"


def read_ids(folder: Path) -> dict:
    """The tracker run ids a folder recorded (``trackers.json``; {} when none)."""
    try:
        return json.loads((folder / TRACKERS_JSON).read_text())
    except (OSError, ValueError):
        return {}


def write_ids(folder: Path, name: str, ids: dict) -> None:
    """Record tracker ``name``'s run ids in ``folder/trackers.json``."""
    write_json(folder / TRACKERS_JSON, {**read_ids(folder), name: ids}, indent=2)
