"""What every part of one consumer shares (:class:`RunContext`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .health import HealthState
from .metrics import ConsumerMetrics
from .options import RunOptions

__all__ = ["RunContext"]


@dataclass(frozen=True)
class RunContext:
    """The options of a consumer, its stop request (set by a signal or a fatal Kafka error),
    its health (progress, readiness) and its metrics."""

    options: RunOptions
    stop_requested: threading.Event = field(default_factory=threading.Event)
    health: HealthState = field(init=False)
    metrics: ConsumerMetrics = field(default_factory=ConsumerMetrics)

    def __post_init__(self) -> None:
        health = HealthState(stall_seconds=self.options.effective_stall_seconds)
        object.__setattr__(self, "health", health)
        self.metrics.track(health)
