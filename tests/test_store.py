"""The LMDB store itself: creation, refusal of foreign directories, offsets."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamstars.config import BuildStarsConfig
from streamstars.errors import StateError
from streamstars.state.store import StarStore
from streamstars.status import store_status


def test_creation_is_atomic_and_leaves_nothing_behind(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with StarStore.open(state, BuildStarsConfig()) as store:
        assert store.applied_visits() == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    with StarStore.open(state, readonly=True) as store:  # metadata is there for readers
        assert store.config == BuildStarsConfig()


def test_an_empty_directory_becomes_a_store(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    with StarStore.open(tmp_path / "state", BuildStarsConfig()):
        pass
    assert (tmp_path / "state" / "data.mdb").exists()


def test_foreign_or_missing_directories_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(StateError, match="not a streamstars state directory"):
        StarStore.open(foreign, BuildStarsConfig())
    with pytest.raises(StateError, match="no data.mdb"):
        StarStore.open(tmp_path / "absent", readonly=True)


def test_offsets_are_recorded_per_topic_and_partition(tmp_path: Path) -> None:
    with StarStore.open(tmp_path / "s", BuildStarsConfig()) as store:
        store.record_offset("visits", 0, 17)
        store.record_offset("visits", 1, 4)
        store.record_offset("visits", 0, 18)
        store.record_offset("other", 0, 99)
        assert store.stored_offsets("visits") == {0: 18, 1: 4}
        assert store.stored_offsets("other") == {0: 99}
        assert store.stored_offsets("vis") == {}
        assert store_status(store)["kafka_offsets"] == {"visits/0": 18, "visits/1": 4,
                                                        "other/0": 99}
