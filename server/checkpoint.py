"""The run directory: global adapter per round and the round state, written atomically.

Layout: RUN_DIR/state.json (settings, completed rounds and their records) and
RUN_DIR/adapters/round_K.safetensors. The adapter of round K is written before the state
that names it, so a crash between the two leaves a consistent, resumable run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import safetensors.numpy

from common.atomic import atomic_write_bytes, atomic_write_json
from common.errors import ConfigError

STATE_FORMAT = "privdistill-run-state"


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state_path = self.path / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def load_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{self.path} has no state.json: nothing to resume; start a new run instead") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{self.state_path} is corrupt ({err}); restore it or start a new run") from err
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"{self.state_path} is not a privdistill run state")
        return state

    def new_state(self, settings: dict) -> dict:
        return {"format": STATE_FORMAT, "version": 1, "settings": settings, "completed_round": 0,
                "adapter": None, "baseline": None, "rounds": []}

    def save_adapter(self, round_id: int, adapter: dict[str, np.ndarray]) -> str:
        relative = f"adapters/round_{round_id}.safetensors"
        (self.path / "adapters").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path / relative, safetensors.numpy.save(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in adapter.items()}))
        return relative

    def load_adapter(self, relative: str) -> dict[str, np.ndarray]:
        return safetensors.numpy.load_file(str(self.path / relative))

    def commit(self, state: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_path, _json_safe(state))


def _json_safe(value):
    """NaN/Inf (e.g. the loss of a round where nothing trained) become null in JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
