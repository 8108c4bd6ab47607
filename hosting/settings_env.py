"""Reading one setting from the environment: the helpers every process's settings share.

Each process (server, gateway, orchestrator) has one typed settings class read once
at start-up; they all read variables through these helpers, so a bad value is
refused the same way everywhere: :class:`ConfigError`, naming the variable. This
module imports nothing of the package, so any layer may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

_N = TypeVar("_N", int, float)
Choice = TypeVar("Choice", bound=str)


class ConfigError(ValueError):
    """The environment cannot produce a working process. Raised at start-up."""


def _number(env: Mapping[str, str], name: str, default: _N, kind: type[_N], minimum: _N) -> _N:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def int_setting(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    return _number(env, name, default, int, minimum)


def float_setting(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    return _number(env, name, default, float, minimum)


def optional_setting(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name, "").strip() or None


def flag_setting(env: Mapping[str, str], name: str) -> bool:
    """A yes/no variable: unset or 0/false/no/off, or 1/true/yes/on; anything else is refused."""
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name} must be 1 or 0 (true/false), got {raw!r}")


def choice_setting(env: Mapping[str, str], name: str, choices: tuple[Choice, ...]) -> Choice:
    """The variable's value if it is one of ``choices`` (unset: the first); ConfigError otherwise."""
    raw = env.get(name, "").strip() or choices[0]
    for choice in choices:
        if raw == choice:
            return choice
    raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
