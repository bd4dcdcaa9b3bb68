"""What ``streamstars run`` is told (:class:`RunOptions`) and the exit codes it returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

__all__ = ["EXIT_KAFKA", "EXIT_OK", "EXIT_STATE", "EXIT_USAGE", "RunOptions",
           "parse_seek_offsets"]

# Exit codes of `streamstars run`.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_STATE = 3
EXIT_KAFKA = 4


@dataclass
class RunOptions:
    """Everything ``streamstars run`` is told (see ``docs/operations.md``)."""

    bootstrap: str
    topic: str
    state: Path
    group: str = "streamstars"
    #: static group membership (``group.instance.id``): a restart keeps the partitions
    group_instance_id: str | None = None
    config_path: Path | None = None
    data_roots: list[Path] = field(default_factory=list)
    kafka_config: dict[str, str] = field(default_factory=dict)
    dead_letter_topic: str | None = None
    snapshot_dir: Path | None = None
    #: ``--snapshot-shared``: ``snapshot_dir`` is shared by the consumers of the group (each
    #: writes its shards' partitions, the snapshot is completed in ``snapshot_dir/snapshot``)
    snapshot_shared: bool = False
    snapshot_every_visits: int | None = None
    snapshot_every_seconds: float | None = None
    snapshot_formats: tuple[str, ...] = ("fits", "parquet")
    snapshot_on_exit: bool = False
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    retry_initial_seconds: float = 0.5
    retry_max_backoff_seconds: float = 30.0
    retry_max_seconds: float = 300.0
    exit_when_idle_seconds: float | None = None
    seek_offsets: dict[int, int] = field(default_factory=dict)
    seek_time: datetime | None = None
    poll_seconds: float = 0.5
    #: visits read and selected ahead of the one being applied (0: none)
    read_ahead: int = 1
    #: /healthz fails when one message has been in flight for longer than this (seconds);
    #: None: ``retry_max_seconds`` + 300
    stall_seconds: float | None = None
    #: largest dead-letter value (bytes); None: the producer's message.max.bytes - 1 KiB
    dead_letter_max_bytes: int | None = None
    #: Butler repository resolving events that name datasets (schema version 2)
    butler: str | None = None
    #: shard backups and partition indexes of a group (``--shard-backups``; None: none)
    shard_backups: Path | None = None
    #: a shard is backed up every this many visits applied to it (``--backup-every-visits``)
    backup_every_visits: int = 100
    #: ``partition.assignment.strategy`` (``--assignment-strategy``; None: librdkafka's
    #: default, or what ``--kafka-config`` says)
    assignment_strategy: str | None = None
    #: ``--warm-query-cache``: derive the queries' density cuts of the shards written, one
    #: density pixel at a time while no message arrives (docs/queries.md)
    warm_query_cache: bool = False

    @property
    def effective_stall_seconds(self) -> float:
        """The stall threshold of ``/healthz`` (see ``stall_seconds``)."""
        if self.stall_seconds is not None:
            return self.stall_seconds
        return self.retry_max_seconds + 300.0


def parse_seek_offsets(values: Sequence[str]) -> dict[int, int]:
    """``PARTITION:OFFSET`` strings -> {partition: offset}.

    Raises:
        ValueError: a value that is not two integers separated by a colon.
    """
    out: dict[int, int] = {}
    for value in values:
        part, _, off = value.partition(":")
        try:
            out[int(part)] = int(off)
        except ValueError as exc:
            raise ValueError(f"--seek-offset takes PARTITION:OFFSET, got {value!r}") from exc
    return out
