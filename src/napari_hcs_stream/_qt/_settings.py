"""Where the widget's defaults come from: environment, then napari plugin settings, then built-in.

The manifest contributes a ``stream`` configuration (napari >= 0.9 shows it under
Preferences > Plugins and saves it next to napari's own settings). The launcher sets the
environment variables, which win so that a pipeline-launched viewer always listens where the
pipeline expects. Older napari has no plugin settings: the built-in defaults apply there.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from ..assembler import parse_cap_gib

log = logging.getLogger(__name__)

PLUGIN = "napari-hcs-stream"
ENV_ENDPOINT = "NAPARI_HCS_STREAM_ENDPOINT"
ENV_AUTOSTART = "NAPARI_HCS_STREAM_AUTOSTART"
ENV_OWNED = "NAPARI_HCS_STREAM_OWNED"
ENV_KEEP_RUNS = "NAPARI_HCS_STREAM_KEEP_RUNS"
ENV_MEMORY_CAP = "NAPARI_HCS_STREAM_MEMORY_CAP"
DEFAULT_ENDPOINT = "default"


def _plugin_settings() -> Any:
    try:
        from napari.settings import get_plugin_settings
    except ImportError:  # napari < 0.9
        return None
    try:
        return get_plugin_settings(PLUGIN).stream
    except Exception as exc:  # not registered (tests, odd installs): fall back quietly
        log.debug("no plugin settings for %s: %s", PLUGIN, exc)
        return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def default_endpoint() -> str:
    env = os.environ.get(ENV_ENDPOINT, "").strip()
    if env:
        return env
    settings = _plugin_settings()
    value = getattr(settings, "endpoint", "") if settings is not None else ""
    return str(value).strip() or DEFAULT_ENDPOINT


def autostart() -> bool:
    if _env_flag(ENV_AUTOSTART):
        return True
    settings = _plugin_settings()
    return bool(getattr(settings, "autostart", False)) if settings is not None else False


def _number(name: str, env: str) -> Any:
    """A numeric setting as given: the environment's text, else the plugin setting, else 0."""
    text = os.environ.get(env, "").strip()
    settings = _plugin_settings()
    return text or (getattr(settings, name, 0) if settings is not None else 0)


def keep_runs() -> int:
    """How many runs the widget keeps, newest first (0: all); a bad value reads as 0."""
    value = _number("keep_runs", ENV_KEEP_RUNS)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0:
        log.warning("ignoring keep_runs=%r: expected a whole number >= 0", value)
        return 0
    return number


def memory_cap() -> int | None:
    """The memory cap for streamed layers in bytes, or None for the assembler's default (half
    the machine's memory); a bad or too small value is logged and reads as None."""
    value = _number("memory_cap_gib", ENV_MEMORY_CAP)
    try:
        gib = parse_cap_gib(value)
    except ValueError as exc:
        log.warning("ignoring memory_cap_gib: %s", exc)
        return None
    return int(gib * (1 << 30)) or None


def launched() -> bool:
    """This napari was started by our launcher (it may close on a ``shutdown`` with close)."""
    return _env_flag(ENV_AUTOSTART) or _env_flag(ENV_OWNED)


def owned() -> bool:
    """This napari belongs to the pipeline run that launched it (any ``shutdown`` closes it)."""
    return _env_flag(ENV_OWNED)


def remember_endpoint(endpoint: str) -> None:
    """Keep the endpoint the user typed for next time (only ever called from a UI action)."""
    _remember("endpoint", endpoint, ENV_ENDPOINT)


def remember_keep_runs(value: int) -> None:
    """Keep the number of runs the user chose for next time (a UI action only)."""
    _remember("keep_runs", value, ENV_KEEP_RUNS)


def remember_memory_cap(gib: float) -> None:
    """Keep the memory cap the user chose for next time (a UI action only)."""
    _remember("memory_cap_gib", gib, ENV_MEMORY_CAP)


def _remember(name: str, value: Any, env: str) -> None:
    """Save a setting, unless the environment decides it for this process."""
    settings = _plugin_settings()
    if settings is None or os.environ.get(env):
        return
    with contextlib.suppress(Exception):
        setattr(settings, name, value)
