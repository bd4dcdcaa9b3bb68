"""Dead-letter records of the consumer (format ``streamstars-dead-letter/1``, docs/events.md).

A dead letter must always fit in one Kafka message, whatever the event it reports: an event
may be as large as the broker accepts, its JSON re-encoded with ``\\uXXXX`` escapes or its
bytes in base64 grow by up to 6x, and a dead letter that the producer or the broker refuses
would be retried forever while the partition waits.  :func:`build_dead_letter` therefore keeps
the record within a byte limit: when the whole event does not fit, a prefix of it is kept
(``event_text`` or ``event_base64``) and ``payload_truncated`` is set; ``payload_bytes`` and
``payload_sha256`` always describe the original value, and ``source`` says where it is
(topic, partition, offset), so the original can be found again while the topic retains it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamstars.errors import ConfigError
from streamstars.events import MalformedEventError, loads_bounded

__all__ = [
    "DEAD_LETTER_SCHEMA",
    "MAX_ERROR_CHARS",
    "MAX_KEY_BYTES",
    "MIN_DEAD_LETTER_BYTES",
    "DeadLetter",
    "build_dead_letter",
    "dead_letter_limit",
    "shrink_limit",
]

DEAD_LETTER_SCHEMA = "streamstars-dead-letter/1"
#: librdkafka's default ``message.max.bytes`` (the producer refuses larger messages).
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000
#: Room left in ``message.max.bytes`` for the key, the header and the record framing.
_FRAMING_BYTES = 1024
#: A longer message key is not reused as the dead letter's key (it is shown shortened).
MAX_KEY_BYTES = 256
#: Error messages are cut to this many characters (they may quote the event).
MAX_ERROR_CHARS = 4096
#: Smallest limit accepted for ``--dead-letter-max-bytes``; a record without its payload
#: takes ~1.5 kB plus the error message.
MIN_DEAD_LETTER_BYTES = 8192
#: Below this, a dead letter is not shrunk further after a broker refusal.
_SHRINK_FLOOR_BYTES = 2048


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter ready to produce.

    Attributes:
        key: the Kafka key to produce it with (the original key, or None when that key is
            longer than :data:`MAX_KEY_BYTES`).
        value: the UTF-8 JSON record.
        truncated: True when the event in the record is only a prefix of the original.
    """

    key: bytes | None
    value: bytes
    truncated: bool


def dead_letter_limit(producer_settings: Mapping[str, Any], configured: int | None) -> int:
    """The largest dead-letter value to produce, in bytes.

    It is the producer's ``message.max.bytes`` (from ``--kafka-config``, else librdkafka's
    default of 1,000,000) less 1 KiB for key, header and framing, lowered to ``configured``
    (``--dead-letter-max-bytes``) when that is given.

    Raises:
        ConfigError: ``message.max.bytes`` is not an integer, or the limit is below
            :data:`MIN_DEAD_LETTER_BYTES`.
    """
    raw = producer_settings.get("message.max.bytes", LIBRDKAFKA_MESSAGE_MAX_BYTES)
    try:
        message_max = int(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--kafka-config: message.max.bytes must be an integer, got {raw!r}") \
            from exc
    limit = message_max - _FRAMING_BYTES
    if configured is not None:
        limit = min(limit, configured)
    if limit < MIN_DEAD_LETTER_BYTES:
        raise ConfigError(
            f"dead letters would be limited to {limit} bytes (message.max.bytes "
            f"{message_max}, --dead-letter-max-bytes {configured}); allow at least "
            f"{MIN_DEAD_LETTER_BYTES} bytes"
        )
    return limit


def shrink_limit(limit: int, produced: int) -> int | None:
    """The next, smaller limit after the broker refused a dead letter of ``produced`` bytes
    as too large (its topic allows less than the producer), or None at the floor."""
    smaller = max(_SHRINK_FLOOR_BYTES, min(limit, produced) // 2)
    return smaller if smaller < min(limit, produced) else None


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters]"


def _encoded(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode("utf-8")


def _text_prefix(text: str, budget: int) -> str:
    """The longest prefix of ``text`` whose JSON string literal (quotes included) takes at
    most ``budget`` bytes (escapes make a character take 1 to 12 bytes)."""
    lo, hi = 0, min(len(text), max(budget, 0))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(json.dumps(text[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def build_dead_letter(
    *,
    source: Mapping[str, Any],
    key: bytes | None,
    value: bytes | None,
    visit: int | None,
    action: str | None,
    error: Mapping[str, Any],
    consumer: Mapping[str, Any],
    dead_lettered_at: str,
    max_bytes: int,
) -> DeadLetter:
    """The dead-letter record of one message, at most ``max_bytes`` bytes of JSON (unless
    even the record without its payload is larger, which :func:`dead_letter_limit` rules out).

    ``source`` holds topic, partition, offset and timestamp_ms; the message key is added from
    ``key`` (shortened, with ``key_bytes`` and ``key_sha256``, when longer than
    :data:`MAX_KEY_BYTES`).  ``error["message"]`` is cut to :data:`MAX_ERROR_CHARS`.  The event
    is kept as ``event`` (parsed JSON), else ``event_text`` (UTF-8) or ``event_base64``; when
    the record would exceed ``max_bytes``, a prefix of the text or of the bytes is kept and
    ``payload_truncated`` is true.
    """
    raw = value or b""
    src, produce_key = _with_key(source, key)
    err = dict(error)
    err["message"] = _cut(str(err.get("message", "")), MAX_ERROR_CHARS)
    record: dict[str, Any] = {
        "schema": DEAD_LETTER_SCHEMA,
        "dead_lettered_at": dead_lettered_at,
        "source": src,
        "visit": visit,
        "action": action,
        "error": err,
        "consumer": dict(consumer),
        "payload_bytes": len(raw),
        "payload_sha256": hashlib.sha256(raw).hexdigest(),
        "payload_truncated": False,
    }
    return _with_payload(record, raw, produce_key, max_bytes)


def _with_key(source: Mapping[str, Any], key: bytes | None) -> tuple[dict[str, Any], bytes | None]:
    """``source`` with the message key (shortened, with its size and digest, when longer than
    :data:`MAX_KEY_BYTES`), and the key to produce the dead letter with (None then)."""
    src: dict[str, Any] = dict(source)
    if key is None:
        src["key"] = None
    elif len(key) <= MAX_KEY_BYTES:
        src["key"] = key.decode("utf-8", "replace")
    else:
        src["key"] = key[:MAX_KEY_BYTES].decode("utf-8", "replace")
        src["key_bytes"] = len(key)
        src["key_sha256"] = hashlib.sha256(key).hexdigest()
        return src, None
    return src, key


def _with_payload(record: dict[str, Any], raw: bytes, produce_key: bytes | None,
                  max_bytes: int) -> DeadLetter:
    """The dead letter of ``record`` with the event ``raw``: whole (parsed, else as text or
    base64) when it fits in ``max_bytes``, else its longest prefix that fits."""
    text: str | None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        try:
            record["event"] = loads_bounded(raw)
            encoded = _encoded(record)
            if len(encoded) <= max_bytes:
                return DeadLetter(produce_key, encoded, False)
            del record["event"]
        except MalformedEventError:
            pass
        record["event_text"] = text
    else:
        record["event_base64"] = base64.b64encode(raw).decode("ascii")
    encoded = _encoded(record)
    if len(encoded) <= max_bytes:
        return DeadLetter(produce_key, encoded, False)

    record["payload_truncated"] = True
    field = "event_text" if text is not None else "event_base64"
    record[field] = ""
    budget = max_bytes - len(_encoded(record))
    if budget < 0:  # the record alone is too large: shorten the message further
        err = record["error"]
        err["message"] = _cut(err["message"], 256)
        budget = max_bytes - len(_encoded(record))
    if text is not None:
        record[field] = _text_prefix(text, budget + 2)  # +2: the quotes already counted
    else:
        kept = max(budget, 0) // 4 * 3  # base64: 4 characters per 3 bytes, no padding
        record[field] = base64.b64encode(raw[:kept]).decode("ascii")
    return DeadLetter(produce_key, _encoded(record), True)
