"""The LMDB store itself: creation, refusal of foreign directories, offsets."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamstars.config import BuildStarsConfig
from streamstars.errors import StateError
from streamstars.state import StarStore, Transaction
from streamstars.state.schema import DB_MEMBERS, member_key
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


def test_writer_cache_drops_least_recently_used_values_past_its_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's cache is heap memory: it never holds more than CACHE_MAX_BYTES, keeps
    the values used last, and still answers from LMDB for what it dropped."""
    import streamstars.state.cache as cache_module

    monkeypatch.setattr(cache_module, "CACHE_MAX_BYTES", 3000)
    values = {k: bytes([k]) * 1000 for k in range(5)}  # member lists of components 0..4
    with StarStore.open(tmp_path / "s", BuildStarsConfig()) as store:
        def put_all(txn: Transaction) -> None:
            for comp_id, value in values.items():
                txn.members.put("g", comp_id, value)

        store.write(put_all)
        keys = [member_key("g", k) for k in values]
        assert store.cache.nbytes <= 3000
        assert [k for _, k in store.cache.keys()] == keys[2:]  # the last three written
        marker = 99  # a cached write: the transaction is surely recorded by LMDB

        def get(wanted: list[int]) -> list[bytes | None]:
            def body(txn: Transaction) -> list[bytes | None]:
                found = [txn.members.find("g", k) for k in wanted]
                txn.members.put("g", marker, b"")
                return found
            return store.write(body)

        def cached() -> list[bytes]:
            return [k for _, k in store.cache.keys() if k != member_key("g", marker)]

        # a hit makes a value the most recently used: keys[2] survives the two misses
        assert get([2, 0, 1]) == [values[k] for k in (2, 0, 1)]
        assert cached() == [keys[2], keys[0], keys[1]]
        assert store.cache.nbytes == 3000
        # dropped values still come from LMDB
        assert get([3]) == [values[3]]
        assert cached() == [keys[0], keys[1], keys[3]]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_trimming_the_writable_map_inside_a_transaction_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers write through the map (writemap): dropping its pages while a transaction has
    dirty pages in it keeps their contents (the kernel keeps them in the page cache), before
    and after the commit, and in a new process' view of the file."""
    import subprocess
    import sys

    monkeypatch.setenv("STREAMSTARS_MAP_RSS_MB", "0.001")
    values = {i: bytes([i % 251]) * (3000 + i) for i in range(400)}
    with StarStore.open(tmp_path / "s", BuildStarsConfig()) as store:
        assert store.env.flags()["writemap"]

        def body(txn: Transaction) -> int:
            for comp_id, value in values.items():
                txn.members.put("g", comp_id, value)
            trims = store.map_trims
            assert store.trim_map_if_large()  # dirty pages of this transaction dropped
            assert store.map_trims > trims
            for comp_id, value in values.items():  # read back through the map (not the cache)
                raw = txn._txn.get(member_key("g", comp_id), db=store.dbs[DB_MEMBERS])
                assert bytes(raw) == value
            return len(values)

        assert store.write(body) == len(values)
        assert store.map_trims > 1
    check = ("import sys, lmdb; env = lmdb.open(sys.argv[1], readonly=True, max_dbs=16); "
             "db = env.open_db(b'members', create=False); txn = env.begin(); "
             "print(sum(len(v) for _, v in txn.cursor(db=db)))")
    done = subprocess.run([sys.executable, "-c", check, str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == sum(len(v) for v in values.values())


def test_writer_cache_is_not_fooled_by_a_transaction_lmdb_did_not_record(
        tmp_path: Path) -> None:
    """A write transaction that changes nothing is not recorded by LMDB, and its id goes to
    the next writer: if that is another process, this writer must still see that process's
    value, not its own cached one."""
    import subprocess
    import sys

    with StarStore.open(tmp_path / "s", BuildStarsConfig()) as store:
        store.write(lambda txn: txn.members.put("g", 7, b"mine"))
        empty_id = store.write(lambda txn: (txn.members.find("g", 7), txn.id())[1])
        other = ("import sys; from streamstars.state import StarStore; "
                 "s = StarStore.open(sys.argv[1]); "
                 "print(s.write(lambda txn: (txn.members.put('g', 7, b'theirs'), "
                 "txn.id())[1]))")
        done = subprocess.run([sys.executable, "-c", other, str(tmp_path / "s")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) == empty_id  # the other process got the unrecorded id
        assert store.write(lambda txn: txn.members.find("g", 7)) == b"theirs"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_file_memory_that_is_not_the_map_does_not_make_every_check_trim(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The map's resident size is measured against the process's other file-backed memory;
    memory mapped after the store was opened (a library imported later, another file) is not
    the map's: one trim finds that out, and the following checks do not trim again."""
    import mmap

    monkeypatch.setenv("STREAMSTARS_MAP_RSS_MB", "1")
    other = tmp_path / "other.bin"
    other.write_bytes(b"\1" * (16 << 20))
    with StarStore.open(tmp_path / "s", BuildStarsConfig()) as store, \
            open(other, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == 4096  # 16 MB resident
        assert store.trim_map_if_large()  # past the budget: the map is trimmed once
        assert not store.trim_map_if_large()  # ... and the other file is not the map's
        assert not store.trim_map_if_large()
        assert store.map_trims == 1


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_forced_trim_drops_the_map_under_its_budget(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``force=True`` (the snapshot between its passes) trims whatever the map's size."""
    monkeypatch.setenv("STREAMSTARS_MAP_RSS_MB", "512")
    with StarStore.open(tmp_path / "s", BuildStarsConfig()) as store:
        assert not store.trim_map_if_large()  # far under the budget
        assert store.trim_map_if_large(force=True)
        assert store.map_trims == 1


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_the_stores_of_one_process_may_share_one_map_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resident memory is the process's: stores opened with one trimmer (one per sky shard)
    are trimmed together, and a closed store is no longer watched."""
    from streamstars.state.environment import MapTrimmer

    monkeypatch.setenv("STREAMSTARS_MAP_RSS_MB", "512")
    trimmer = MapTrimmer()
    with StarStore.open(tmp_path / "a", BuildStarsConfig(), trimmer=trimmer) as a, \
            StarStore.open(tmp_path / "b", BuildStarsConfig(), trimmer=trimmer) as b:
        assert a.trimmer is b.trimmer is trimmer
        assert trimmer.trim_if_large(force=True)
        assert trimmer.trims == 2  # the one mapping of each store's data.mdb
        a.close()
        assert trimmer.data_files == [tmp_path / "b" / "data.mdb"]
        assert b.trim_map_if_large(force=True)
        assert trimmer.trims == 3
    assert trimmer.data_files == []
