"""Typed errors: one class per failure mode a caller can act on.

Every error names what failed (file, visit, column, key) and says what to do.  The Kafka runtime
maps :class:`PermanentInputError` subclasses to dead letters and :class:`TransientInputError`
to retries with backoff.
"""

from __future__ import annotations


class StreamstarsError(Exception):
    """Base class of every error streamstars raises on purpose."""


class ConfigError(StreamstarsError):
    """A configuration file or value is invalid (unknown key, wrong type, bad value)."""


class PermanentInputError(StreamstarsError):
    """An input can never be applied as it is (retrying will not help)."""


class InputFileError(PermanentInputError):
    """A file is missing, truncated, not of the expected format, or lacks required columns."""


class InvalidSourceTableError(InputFileError):
    """A source table's content is invalid (NaN coordinates, duplicate ids, mixed visits ...)."""


class MissingMetadataError(PermanentInputError):
    """A visit has source tables but no visit metadata (visitSummary / visitTable row)."""


class InvalidMetadataError(MissingMetadataError):
    """A visit's metadata is there but unusable (non-finite boresight or date, a band name the
    store cannot key, negative detector ids): as good as missing."""


class SourceIdReuseError(InvalidSourceTableError):
    """A visit's sourceIds are already stored for another visit (sourceIds are unique per
    instrument): the later visit is refused."""


class VisitConflictError(PermanentInputError):
    """A visit was already applied with different content and ``replace`` was not asked for."""


class FootprintMissError(PermanentInputError):
    """A shard event's visit routes observations to a shard its footprint (the event's
    ``shards``) does not list: those rows would never reach their shard (the publisher's
    footprint is wrong).  Dead-lettered as ``footprint_missed_shard``, never dropped."""


class RefcatError(PermanentInputError):
    """A reference catalog cannot be used (bad version, missing shards or columns)."""


class TransientInputError(StreamstarsError):
    """An input is not readable *yet* (file not there, filesystem timeout): retry later."""


class SourceFileMissingError(TransientInputError):
    """A source table named by a visit does not exist (yet): retry, then give up."""


class StateError(StreamstarsError):
    """The state directory cannot be used (other format version, incompatible config)."""


class ShardError(StateError):
    """A sky shard of a state directory is missing or damaged (its directory, its LMDB
    environment, or another shard's store in its place): named in the message; nothing was
    written.  A backfill stops (like a full disk), the consumer exits."""


class DiskFullError(StateError):
    """The store's file system is (nearly) full: nothing more can be written until space is
    freed; a backfill stops (it resumes where it stopped), the consumer exits."""


class ShardBackupError(StreamstarsError):
    """A shard backup (``run --shard-backups``) cannot be written — an unwritable or full
    backup directory, named in the message — or cannot be restored.  Never stops the consumer:
    a failed backup is retried at the next opportunity, a failed restore falls back to an
    older backup, the local copy or a replay of the partition."""


class ShardBackupRejected(ShardBackupError):
    """A shard backup failed its verification (no manifest: partial; a data.mdb whose sha256
    differs from the manifest's: corrupt; another shard or configuration): it is not used."""


class ButlerError(ConfigError):
    """A Butler repository, collection or dataset type cannot be used as given (the extra not
    installed, repository or collection not found, dataset type not registered ...)."""


class DatasetFileMissingError(TransientInputError):
    """A Butler dataset is registered but its file is not in the datastore (not yet, or lost):
    the consumer retries, a backfill fails the visit."""


class StarNotFoundError(StreamstarsError):
    """``streamstars star ID``: no star the snapshot would publish has this ``fgcm_id`` (the
    message says whether the sourceId is stored at all); exit code 1."""
