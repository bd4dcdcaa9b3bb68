"""``streamstars publish --watch``: complete files only, no duplicates across restarts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from kafka_broker import TansuBroker

from streamstars.consumers.publisher import watch_repo
from streamstars.events import parse_event


@pytest.mark.kafka  # starts its own broker
def test_watch_publishes_complete_visits_once(tmp_path: Path) -> None:
    from streamstars.simulate import simulate_survey

    survey = simulate_survey(tmp_path / "sim", n_visits=4, seed=5, sources_per_visit=300,
                             write_refcat=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(survey.visit_table_path, repo)
    shutil.copy(survey.ccd_visit_table_path, repo)
    sources = [Path(p) for p in survey.source_paths]
    # Two complete visits, one half-written file (its parquet footer is missing).
    for src in sources[:2]:
        shutil.copy(src, repo)
    partial = repo / sources[2].name
    partial.write_bytes(sources[2].read_bytes()[: sources[2].stat().st_size // 2])
    state_file = tmp_path / "watch-state.json"

    with TansuBroker.start() as broker:
        broker.create_topic("w", partitions=1)
        sent: list[list[int]] = []
        # First poll only notes the files; the second (unchanged) poll publishes.
        watch_repo(repo, broker.bootstrap, "w", state_file, poll_seconds=0.05, max_polls=1,
                   on_publish=sent.append)
        assert sent == []
        watch_repo(repo, broker.bootstrap, "w", state_file, poll_seconds=0.05, max_polls=2,
                   on_publish=sent.append)
        assert sent == [survey.visits[:2]]
        # The file is completed, a fourth visit appears; a restarted watcher publishes only
        # those two.
        shutil.copy(sources[2], partial)
        shutil.copy(sources[3], repo)
        watch_repo(repo, broker.bootstrap, "w", state_file, poll_seconds=0.05, max_polls=3,
                   on_publish=sent.append)
        assert [v for batch in sent for v in batch] == survey.visits[:4]
        # Restarting again publishes nothing.
        watch_repo(repo, broker.bootstrap, "w", state_file, poll_seconds=0.05, max_polls=3,
                   on_publish=sent.append)
        assert len([v for batch in sent for v in batch]) == 4

        messages = broker.consume_all("w", 4, timeout=20)
        events = [parse_event(m.value(), m.key()) for m in messages]
        assert sorted(e.visit for e in events) == sorted(survey.visits)
        assert {e.action for e in events} == {"apply"}
        assert json.loads(state_file.read_text())["format"] == 1
