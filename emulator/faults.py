"""Fault knobs: the run-time copy that POST /_emulator/faults updates.

Their start values come from :class:`~emulator.config.EmulatorConfig`; the admin endpoint
merges partial updates (validated as a whole, so a bad key changes nothing) and
``POST /_emulator/reset`` restores the configured values.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

from emulator.config import FAULT_FIELDS, EmulatorConfig


class FaultError(ValueError):
    """A fault update names an unknown knob or gives a value of the wrong kind."""


@dataclass
class Faults:
    """The current fault knobs; see EmulatorConfig for what each one does."""

    fail_rate: float = 0.0
    drop_after_chunks: int | None = None
    omit_kv_params: bool = False
    extra_latency_ms: float = 0.0
    unhealthy: bool = False
    stop_after_first_token: bool = False

    @classmethod
    def from_config(cls, config: EmulatorConfig) -> Faults:
        return cls(**{name: getattr(config, name) for name in FAULT_FIELDS})

    def restore(self, config: EmulatorConfig) -> None:
        """Back to the configured values."""
        for name in FAULT_FIELDS:
            setattr(self, name, getattr(config, name))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def update(self, changes: object) -> None:
        """Merge a partial update; raises FaultError (and changes nothing) if any part is bad."""
        if not isinstance(changes, dict):
            raise FaultError("the body must be a JSON object of fault knobs")
        checked: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in FAULT_FIELDS:
                raise FaultError(
                    f"unknown fault knob {key!r}; known: {', '.join(FAULT_FIELDS)}"
                )
            checked[key] = _check(key, value)
        for key, value in checked.items():
            setattr(self, key, value)

    def roll_failure(self, rng: random.Random) -> bool:
        """True if this request should fail (fail_rate); one roll per request."""
        return self.fail_rate > 0 and rng.random() < self.fail_rate


def _check(key: str, value: object) -> Any:
    if key in ("omit_kv_params", "unhealthy", "stop_after_first_token"):
        if not isinstance(value, bool):
            raise FaultError(f"{key} must be true or false, got {value!r}")
        return value
    if key == "drop_after_chunks":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FaultError(f"drop_after_chunks must be an integer >= 0 or null, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FaultError(f"{key} must be a number, got {value!r}")
    if key == "fail_rate" and not 0.0 <= value <= 1.0:
        raise FaultError(f"fail_rate must be within 0..1, got {value!r}")
    if key == "extra_latency_ms" and value < 0:
        raise FaultError(f"extra_latency_ms must be >= 0, got {value!r}")
    return float(value)
