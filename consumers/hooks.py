"""Hooks into the steps of the consumer, for tests: the crash tests kill the process at named
steps (``tests/crash_hooks.py``).

:class:`Runner <.runner.Runner>` calls a :class:`ConsumerHooks` at a few steps of each message.
The default, :data:`NO_HOOKS`, does nothing (an empty method call per step).  ``streamstars
run`` uses other hooks only when the environment variable ``STREAMSTARS_CONSUMER_HOOKS`` names
an importable module (:func:`load_hooks`); that module's ``consumer_hooks()`` returns them.
The variable is a test setting: leave it unset in production.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from streamstars.errors import ConfigError
from streamstars.events import VisitEvent

if TYPE_CHECKING:
    from streamstars.state import StateDirectory

    from .kafka_client import Position

__all__ = ["ENV_HOOKS", "NO_HOOKS", "ConsumerHooks", "load_hooks"]

log = logging.getLogger("streamstars.run")

#: Names the module whose ``consumer_hooks()`` gives the hooks (tests only).
ENV_HOOKS = "STREAMSTARS_CONSUMER_HOOKS"


class ConsumerHooks:
    """The steps a consumer reports; every method does nothing here (subclass to act)."""

    def store_opened(self, store: StateDirectory) -> None:
        """The state directory is open and checked; no event was consumed yet."""

    def event_parsed(self, event: VisitEvent) -> None:
        """A message's event was decoded; nothing is written for it yet."""

    def apply_started(self, event: VisitEvent) -> None:
        """The visit of ``event`` was read and selected; its write transaction begins."""

    def visit_applied(self, event: VisitEvent, status: str, next_offset: int) -> None:
        """The transaction of ``event`` committed with ``status`` (``applied``, ``replaced``,
        ``retracted``, ``skipped``, ``absent``) and the partition's next offset."""

    def offset_stored(self, position: Position) -> None:
        """The message at ``position`` is done in LMDB (its visit applied or skipped, or its
        dead letter delivered, and its next offset recorded); Kafka's commit comes next."""

    def offset_committed(self, position: Position) -> None:
        """The message's next offset is committed to Kafka too: the message is finished."""

    def snapshot_started(self) -> None:
        """A periodic snapshot starts (in the snapshot thread)."""

    def shard_restored(self, pixel: int, source: str, offset: int) -> None:
        """A shard of a newly assigned partition was made current before the partition is
        consumed: installed from a backup holding the partition's events below ``offset``
        (``source`` ``backup``), the state's own copy kept (``local``), or left to a replay
        from the partition's start (``replay``, ``offset`` 0)."""


#: The hooks of a production consumer: none.
NO_HOOKS = ConsumerHooks()


def load_hooks(environ: Mapping[str, str] | None = None) -> ConsumerHooks:
    """The hooks named by ``STREAMSTARS_CONSUMER_HOOKS`` in ``environ`` (default
    ``os.environ``), or :data:`NO_HOOKS` when it is unset or empty.

    Raises:
        ConfigError: the module cannot be imported, has no ``consumer_hooks()``, or that does
            not return a :class:`ConsumerHooks`.
    """
    name = (os.environ if environ is None else environ).get(ENV_HOOKS, "").strip()
    if not name:
        return NO_HOOKS
    try:
        hooks = importlib.import_module(name).consumer_hooks()
    except Exception as exc:  # noqa: BLE001 - any failure of a test module is a setting error
        raise ConfigError(f"{ENV_HOOKS}={name!r}: cannot load consumer hooks "
                          f"({type(exc).__name__}: {exc}); it is a test setting, unset it") \
            from exc
    if not isinstance(hooks, ConsumerHooks):
        raise ConfigError(f"{ENV_HOOKS}={name!r}: consumer_hooks() returned "
                          f"{type(hooks).__name__}, not ConsumerHooks")
    log.warning("consumer hooks from %s=%s (a test setting)", ENV_HOOKS, name)
    return hooks
