"""Shared fixtures: where the real data fixtures live, a Kafka-protocol broker, small helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka_broker import TansuBroker

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real LSST/HSC/CFHT files); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data fixtures not found at {SHARED_DATA} (../shared/data is absent)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """One tansu broker for the test module (skips when tansu is absent); each test uses its
    own topics and group.  A test that takes it is marked ``kafka`` (and ``slow``)."""
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with TansuBroker.start(log_path=log) as b:
        yield b


# ------------------------------------------------------------------------------ markers
#: modules whose tests start real processes or write whole surveys (seconds each)
_SLOW_MODULES = frozenset({"test_hostile_ingest", "test_hostile_snapshot_config",
                           "test_report"})


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "kafka: uses a real Kafka-protocol broker (tansu) and consumer processes",
        "butler: builds real Butler repositories (lsst-daf-butler)",
        "browser: drives Debian's headless chromium",
        "slow: takes seconds (processes, whole surveys); the fast subset is -m 'not slow'",
    ):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers by what a test uses: the broker (kafka), a Butler repository (butler), the
    browser; each of those, and the modules of :data:`_SLOW_MODULES`, is also ``slow``."""
    for item in items:
        name = getattr(getattr(item, "module", None), "__name__", "")
        markers = {m for m in ("kafka", "butler", "browser") if item.get_closest_marker(m)}
        if any("broker" in fixture for fixture in getattr(item, "fixturenames", ())):
            markers.add("kafka")
        if Path(str(item.fspath)).parent.name == "butler":
            markers.add("butler")
        if "chromium" in item.name:
            markers.add("browser")
        if markers or name.rsplit(".", 1)[-1] in _SLOW_MODULES:
            markers.add("slow")
        for marker in sorted(markers):
            item.add_marker(getattr(pytest.mark, marker))
