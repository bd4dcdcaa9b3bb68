"""librdkafka client settings from a properties file (``--kafka-config FILE``).

The file holds ``key=value`` lines (``#`` or ``!`` start a comment), the format of Kafka's
``client.properties``.  Security settings (``security.protocol``, ``sasl.*``, ``ssl.*``) belong
there, never on the command line.  Values are never logged: :func:`redacted` shows only keys.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from streamstars.errors import ConfigError

__all__ = ["load_kafka_properties", "redacted"]


def load_kafka_properties(path: str | Path | None) -> dict[str, str]:
    """Read a librdkafka properties file; ``None`` gives an empty dict.

    Raises:
        ConfigError: unreadable file or a line without ``=`` (the line number is named, the
            line itself is not, since it may hold a secret).
    """
    if path is None:
        return {}
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read Kafka client config {path}: {exc.strerror}") from exc
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        if "=" not in line:
            raise ConfigError(f"{path}:{number}: expected key=value (line not shown)")
        key, value = line.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"{path}:{number}: empty key")
        out[key] = value.strip()
    if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH) and _has_secret(out):
        import logging

        logging.getLogger(__name__).warning(
            "Kafka client config %s holds credentials but is readable by group/others; "
            "chmod 600 it",
            path,
        )
    return out


def _has_secret(settings: Mapping[str, str]) -> bool:
    return any("password" in k or "secret" in k or k.endswith(".key.pem") for k in settings)


def redacted(settings: Mapping[str, object]) -> str:
    """The keys of a client config, for logs; values are never shown."""
    return ", ".join(sorted(settings)) or "(none)"
