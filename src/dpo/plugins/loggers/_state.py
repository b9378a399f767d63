"""A logger's small state file in the run directory (the tracker's run id), so that a resumed
run continues the tracker's run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any



def read_state(path: Path) -> dict[str, Any]:
    """The state in ``path``, or {} where there is none or it is not a JSON object."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically."""
    from dpo.core.training.checkpoint import write_json_atomic

    write_json_atomic(path, state)
