"""Environments that score plans (replay, simulated, live) and what they share."""

from __future__ import annotations

from typing import Any

from executors.environment import Environment, EnvironmentInfo, Evaluation
from graphs.errors import DataError

__all__ = ["Environment", "EnvironmentInfo", "Evaluation", "environment_from_spec"]


def environment_from_spec(spec: dict[str, Any]) -> Environment:
    """Rebuild an environment from ``Environment.spec()`` (how a worker gets the study's environment)."""
    kind = spec.get("kind")
    if kind == "replay":
        from executors.replay import ReplayEnvironment

        return ReplayEnvironment.from_spec(spec)
    if kind == "simulated":
        from executors.simulated import SimulatedEnvironment

        return SimulatedEnvironment.from_spec(spec)
    if kind == "live":
        from executors.live import LiveEnvironment

        return LiveEnvironment.from_spec(spec)
    raise DataError(f"unknown environment kind {kind!r}: expected replay, simulated or live")
