"""The ``run`` and ``publish`` subcommands (added to ``streamstars`` by :func:`add_commands`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .publisher import ShardRouting

__all__ = ["add_commands", "cmd_publish", "cmd_run"]


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _dead_letter_bytes(text: str) -> int:
    from .dead_letters import MIN_DEAD_LETTER_BYTES

    value = int(text)
    if value < MIN_DEAD_LETTER_BYTES:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_DEAD_LETTER_BYTES}, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _iso_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone (e.g. Z for UTC): {text!r}")
    return when


def _verbose_logging() -> None:
    """The daemons log INFO lines even without ``-v`` (the root handler is set by main)."""
    logging.getLogger("streamstars").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_run(args: argparse.Namespace) -> int:
    """``streamstars run``: consume visit events until SIGTERM/SIGINT."""
    from streamstars.errors import ConfigError

    from .hooks import load_hooks
    from .kafka_config import load_kafka_properties
    from .options import RunOptions, parse_seek_offsets
    from .runner import Runner

    _verbose_logging()
    if not args.data_root and not args.butler:
        print("streamstars run: error: give at least one --data-root (events may only name "
              "files under these directories), or --butler REPO", file=sys.stderr)
        return 2
    shard_backups = None
    if args.shard_backups is not None:
        from .shard_backups import backup_root

        try:
            shard_backups = backup_root(args.shard_backups)
        except ConfigError as exc:
            print(f"streamstars run: error: {exc}", file=sys.stderr)
            return 2
    elif args.backup_every_visits is not None:
        print("streamstars run: error: --backup-every-visits needs --shard-backups",
              file=sys.stderr)
        return 2
    dead_letter = args.dead_letter_topic
    if dead_letter is None:
        dead_letter = f"{args.topic}.dead-letters"
    options = RunOptions(
        bootstrap=args.bootstrap_servers,
        topic=args.topic,
        state=Path(args.state),
        group=args.group,
        group_instance_id=args.group_instance_id,
        config_path=Path(args.config) if args.config else None,
        data_roots=[Path(p) for p in args.data_root or []],
        kafka_config=load_kafka_properties(args.kafka_config),
        dead_letter_topic=dead_letter or None,
        snapshot_dir=Path(args.snapshot_dir) if args.snapshot_dir else None,
        snapshot_every_visits=args.snapshot_every_visits,
        snapshot_every_seconds=args.snapshot_every_seconds,
        snapshot_formats=tuple(f.strip() for f in args.snapshot_format.split(",") if f.strip()),
        snapshot_on_exit=args.snapshot_on_exit,
        snapshot_shared=args.snapshot_shared,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        retry_max_seconds=args.retry_max_seconds,
        exit_when_idle_seconds=args.exit_when_idle,
        seek_offsets=parse_seek_offsets(args.seek_offset or []),
        seek_time=args.seek_time,
        read_ahead=args.read_ahead,
        stall_seconds=args.stall_seconds,
        dead_letter_max_bytes=args.dead_letter_max_bytes,
        butler=args.butler,
        shard_backups=shard_backups,
        backup_every_visits=args.backup_every_visits or 100,
        assignment_strategy=args.assignment_strategy,
        warm_query_cache=args.warm_query_cache,
    )
    if options.snapshot_shared and options.snapshot_dir is None:
        print("streamstars run: error: --snapshot-shared needs --snapshot-dir SHARED (the "
              "directory the consumers of the group share)", file=sys.stderr)
        return 2
    if options.snapshot_dir is not None and not (
        options.snapshot_every_visits or options.snapshot_every_seconds
        or options.snapshot_on_exit
    ):
        options.snapshot_every_seconds = 600.0
    try:
        hooks = load_hooks()
    except ConfigError as exc:
        print(f"streamstars run: error: {exc}", file=sys.stderr)
        return 2
    return Runner(options, hooks).run()


def shard_routing(args: argparse.Namespace) -> ShardRouting | None:
    """The routing of ``publish``'s options: None (version-1/2 events keyed by visit, as
    before) unless ``--partitions``, ``--shard-nside`` or ``--shard-margin`` is given; the
    shard settings from ``--shard-nside`` / ``--shard-margin`` (the others from the defaults),
    or from ``--config FILE``'s ``shardNside`` / ``shardMargin``.

    Raises:
        ConfigError: both ``--shard-*`` and ``--config``, or settings a configuration refuses.
    """
    import dataclasses

    from streamstars.config import BuildStarsConfig, load_config
    from streamstars.errors import ConfigError
    from streamstars.footprint import ShardSpec

    from .publisher import ShardRouting

    explicit = {name: value for name, value in (("shardNside", args.shard_nside),
                                                ("shardMargin", args.shard_margin))
                if value is not None}
    if not explicit and args.partitions is None:
        return None
    if explicit and args.config:
        raise ConfigError("give the shard settings either with --shard-nside/--shard-margin "
                          "or as shardNside/shardMargin in --config FILE, not both (the "
                          "consumers must use the same)")
    config = load_config(args.config) if args.config else BuildStarsConfig()
    if explicit:
        # rebuilt from its fields so that validation (and the derived margin) apply again
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        if "shardMargin" not in explicit:
            fields["shardMargin"] = float("nan")
        config = BuildStarsConfig(**{**fields, **explicit})
    return ShardRouting(ShardSpec.of_config(config), args.partitions)


def cmd_publish(args: argparse.Namespace) -> int:
    """``streamstars publish``: events for a repository's visits (once, or watching)."""
    from streamstars.config import load_config

    from .kafka_config import load_kafka_properties

    _verbose_logging()
    settings = load_kafka_properties(args.kafka_config)
    routing = shard_routing(args)  # ConfigError: exit 2 (streamstars.cli.main)
    if routing is not None:
        logging.getLogger("streamstars.publish").info(
            "routing events by shard (schema version 3): shardNside %d, shardMargin %g "
            "arcsec", routing.spec.nside, routing.spec.margin_arcsec)
    if args.butler:
        from streamstars.butler.cli import publish_from_butler

        return publish_from_butler(args, settings, routing)
    if not args.repo:
        print("streamstars publish: error: give the repository directory (or --butler REPO)",
              file=sys.stderr)
        return 2
    reference_ccd = load_config(args.config).referenceCCD if args.config else 40
    return _publish_directory(args, settings, routing, reference_ccd)  # TopicError: exit 2


def _publish_directory(args: argparse.Namespace, settings: dict[str, str],
                       routing: ShardRouting | None, reference_ccd: int) -> int:
    """``publish REPO`` once, or ``--watch``."""
    from .publisher import publish_repo, watch_repo

    if not args.watch:
        summary = publish_repo(args.repo, args.bootstrap_servers, args.topic, settings,
                               reference_ccd=reference_ccd, instrument=args.instrument,
                               routing=routing)
        shards = "" if routing is None else \
            f" as {summary.events} shard event(s) on {summary.partitions} partition(s)"
        print(f"published {len(summary.published)} visit event(s) to {args.topic}{shards}; "
              f"{len(summary.skipped)} visit(s) not publishable, "
              f"{len(summary.problems)} discovery problem(s)")
        return 0
    state_file = Path(args.watch_state) if args.watch_state else \
        Path(args.repo) / ".streamstars-published.json"
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    watch_repo(args.repo, args.bootstrap_servers, args.topic, state_file, settings,
               poll_seconds=args.poll_seconds, reference_ccd=reference_ccd,
               instrument=args.instrument, stop=stop, max_polls=args.max_polls,
               routing=routing)
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``run`` and ``publish`` to the ``streamstars`` argparse subparsers."""
    p = subparsers.add_parser(
        "run",
        help="consume visit events from Kafka and apply them (nightly operation)",
        description="Consume visit events and apply each visit exactly once to the LMDB "
        "store.  Kafka client settings (security included) come only from --kafka-config.",
    )
    p.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT")
    p.add_argument("--topic", required=True)
    p.add_argument("--state", required=True, metavar="DIR", help="LMDB state directory")
    p.add_argument("--group", default="streamstars",
                   help="consumer group (default %(default)s); consumers of one group, each "
                   "with its own --state, share the partitions (docs/operations.md "
                   "\"Scale-out\")")
    p.add_argument("--group-instance-id", metavar="ID",
                   help="static group membership (group.instance.id, e.g. the pod name): a "
                   "consumer restarted within session.timeout.ms keeps its partitions "
                   "without a rebalance")
    p.add_argument("--assignment-strategy", choices=("range", "cooperative-sticky"),
                   help="partition.assignment.strategy of the group (default: librdkafka's "
                   "range,roundrobin, or what --kafka-config says); every consumer of a group "
                   "must use the same (docs/operations.md \"Scale-out\")")
    p.add_argument("--shard-backups", metavar="DIR_OR_URI",
                   help="shard backups and partition indexes shared by the group (a directory "
                   "or a file:// URI every consumer mounts): a partition assigned to this "
                   "consumer is restored from the newest backups of its shards instead of "
                   "replayed from its start")
    p.add_argument("--backup-every-visits", type=_positive_int, metavar="N",
                   help="back a shard up every N visits applied to it (default 100; needs "
                   "--shard-backups)")
    p.add_argument("--config", metavar="FILE", help="TOML configuration (fgcmcal field names)")
    p.add_argument("--data-root", action="append", metavar="DIR",
                   help="directory events may point into (repeatable; required)")
    p.add_argument("--kafka-config", metavar="FILE",
                   help="librdkafka properties file (SASL/SSL ...); never logged")
    p.add_argument("--dead-letter-topic", metavar="TOPIC",
                   help="topic for dead letters (default TOPIC.dead-letters; '' to only log)")
    p.add_argument("--dead-letter-max-bytes", type=_dead_letter_bytes, metavar="N",
                   help="largest dead letter in bytes; a larger event is cut, with its size "
                   "and sha256 kept (default: the producer's message.max.bytes - 1024)")
    p.add_argument("--snapshot-dir", metavar="OUT", help="write periodic snapshots here")
    p.add_argument("--snapshot-every-visits", type=_positive_int, metavar="N")
    p.add_argument("--snapshot-every-seconds", type=_positive_float, metavar="T")
    p.add_argument("--snapshot-format", default="fits,parquet", help="fits and/or parquet")
    p.add_argument("--snapshot-on-exit", action="store_true",
                   help="write a last snapshot when stopping (if anything changed)")
    p.add_argument("--snapshot-shared", action="store_true",
                   help="--snapshot-dir is shared by the consumers of the group: write the "
                   "partitions of this consumer's shards into it and complete the snapshot "
                   "OUT/snapshot from every consumer's newest partitions")
    p.add_argument("--metrics-port", type=int, metavar="P",
                   help="serve /metrics /healthz /readyz on this port (0: any free port)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics server binds to (default %(default)s)")
    p.add_argument("--retry-max-seconds", type=_positive_float, default=300.0,
                   help="give up on a transient error after this long and dead-letter the "
                   "event (default %(default)s)")
    p.add_argument("--stall-seconds", type=_positive_float, metavar="S",
                   help="/healthz fails (503) when one message has been in flight for longer "
                   "than this (default: --retry-max-seconds + 300)")
    p.add_argument("--seek-offset", action="append", metavar="PARTITION:OFFSET",
                   help="replay: start this partition here at the first assignment")
    p.add_argument("--seek-time", type=_iso_time, metavar="ISO8601",
                   help="replay: start every partition at the first event at/after this time")
    p.add_argument("--exit-when-idle", type=_positive_float, metavar="SECONDS",
                   help="exit cleanly after this long without a message (batch replays)")
    p.add_argument("--read-ahead", type=_non_negative_int, default=1, metavar="N",
                   help="visits of a backlog read and selected while the previous one is "
                   "applied (default %(default)s; 0: one at a time)")
    p.add_argument("--butler", metavar="REPO", help="resolve events naming Butler datasets "
                   "(schema version 2) in this repository (needs streamstars[butler])")
    p.add_argument("--warm-query-cache", action="store_true",
                   help="when no message arrived for a second, derive the star / cone "
                   "queries' density cuts of the shards written, one density pixel between "
                   "two polls (docs/queries.md)")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser(
        "publish",
        help="publish one visit event per visit of a repository (optionally watching it)",
    )
    p.add_argument("repo", nargs="?", help="repository directory (same discovery as backfill)")
    p.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT")
    p.add_argument("--topic", required=True)
    p.add_argument("--kafka-config", metavar="FILE", help="librdkafka properties file")
    p.add_argument("--config", metavar="FILE",
                   help="TOML configuration (referenceCCD; with shard routing also shardNside "
                   "and shardMargin)")
    p.add_argument("--instrument", help="instrument name when the metadata has none")
    p.add_argument("--watch", action="store_true",
                   help="keep watching and publish each visit once its files are complete")
    p.add_argument("--poll-seconds", type=_positive_float, default=30.0)
    p.add_argument("--watch-state", metavar="FILE",
                   help="what was published (default REPO/.streamstars-published.json; "
                   "required with --butler --watch)")
    p.add_argument("--max-polls", type=_positive_int, help=argparse.SUPPRESS)
    g = p.add_argument_group(
        "routing by sky shard (event schema version 3; docs/events.md, docs/operations.md)",
        "Given any of these, every visit is published as one event per shard of its "
        "footprint, keyed by the shard, on the partition murmur2(key) % P; without them, one "
        "version-1/2 event per visit keyed by visit, as before.")
    g.add_argument("--partitions", type=_positive_int, metavar="P",
                   help="create the topic with P partitions when it does not exist (an "
                   "existing topic keeps its own)")
    g.add_argument("--shard-nside", type=_positive_int, metavar="N",
                   help="the consumers' shardNside (default 32; or shardNside in --config)")
    g.add_argument("--shard-margin", type=_positive_float, metavar="ARCSEC",
                   help="the consumers' shardMargin (default: derived from the radii; or "
                   "shardMargin in --config)")
    g = p.add_argument_group("Butler repository (needs streamstars[butler]; docs/butler.md)")
    g.add_argument("--butler", metavar="REPO",
                   help="publish the visits of this Butler repository's collections")
    g.add_argument("--collections", metavar="C[,C...]",
                   help="collections to search, in order (first match wins)")
    g.add_argument("--where", metavar="EXPR", default="",
                   help="Butler query expression on the data IDs")
    g.add_argument("--overlap-seconds", type=_positive_float, default=300.0,
                   help="each poll looks again this far before the ingest_date watermark "
                   "(default %(default)s)")
    g.add_argument("--full-every", type=_non_negative_int, default=20, metavar="N",
                   help="compare every (visit, UUID) pair every N polls (default "
                   "%(default)s; also at start and when a chain changes)")
    p.set_defaults(func=cmd_publish)
