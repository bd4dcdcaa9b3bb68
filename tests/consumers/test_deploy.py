"""``deploy/``: the compose file, the Kubernetes manifests, the Prometheus configuration and the
Grafana dashboard.  Without Docker or a cluster: the files parse, every command line they run
parses with streamstars' own CLI parser, the consumers form one group with distinct static
membership ids and state volumes, and every metric (and label) the dashboard queries is
exported by a real consumer's ``/metrics`` (two consumers of one group on the tansu broker)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from consumer_helpers import ConsumerProcess, consumer_args, http_get, wait_until
from kafka_broker import TansuBroker, free_port

from streamstars.cli import build_parser
from streamstars.config import BuildStarsConfig
from streamstars.consumers.partitioner import shard_partition
from streamstars.consumers.publisher import ShardRouting, publish_repo
from streamstars.footprint import ShardSpec
from streamstars.simulate import SimulatedSurvey, simulate_survey

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NSIDE = 64


def _option(args: list[str], name: str) -> list[str]:
    """The values of ``--name=V`` / ``--name V`` in ``args``."""
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            values.append(arg.split("=", 1)[1])
        elif arg == name and i + 1 < len(args):
            values.append(args[i + 1])
    return values


# ------------------------------------------------------------------------------ compose
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _consumers(compose: dict[str, Any]) -> dict[str, list[str]]:
    return {name: service["command"] for name, service in compose["services"].items()
            if service.get("command", [None])[0] == "run"}


def test_compose_runs_two_consumers_of_one_group_on_a_two_partition_topic(
        compose: dict[str, Any]) -> None:
    services = compose["services"]
    consumers = _consumers(compose)
    assert len(consumers) == 2
    parser = build_parser()
    parsed = {name: parser.parse_args(args) for name, args in consumers.items()}
    assert len({(a.group, a.topic, a.bootstrap_servers) for a in parsed.values()}) == 1
    ids = {a.group_instance_id for a in parsed.values()}
    assert None not in ids and len(ids) == 2  # static membership, one id per consumer
    # each its own state volume, mounted where its --state is
    volumes = {}
    for name, args in parsed.items():
        mounts = dict(m.split(":")[:2][::-1] for m in services[name]["volumes"]
                      if not m.startswith("$"))
        (mount,) = [m for m in mounts if args.state.startswith(m + "/")]
        volumes[name] = mounts[mount]
        assert mounts[mount] in compose["volumes"]
        assert args.metrics_port and args.metrics_host == "0.0.0.0"
    assert len(set(volumes.values())) == 2
    # ... and the same backup and shared-snapshot volumes, mounted where their options point
    for option in ("shard_backups", "snapshot_dir"):
        shared = set()
        for name, args in parsed.items():
            mounts = dict(m.split(":")[:2][::-1] for m in services[name]["volumes"]
                          if not m.startswith("$"))
            shared.add(mounts[getattr(args, option)])
        assert len(shared) == 1 and shared <= set(compose["volumes"]), (option, shared)
        assert shared.isdisjoint(volumes.values())
    assert all(a.snapshot_shared and a.backup_every_visits for a in parsed.values())
    # the topic they share has 2 partitions; the publisher publishes by shard on it
    (create,) = services["create-topics"]["command"]
    topic = next(iter(parsed.values())).topic
    creates = [line for line in create.replace("\\\n", " ").splitlines()
               if f"--topic {topic} " in line]
    assert len(creates) == 1 and "--partitions 2 " in creates[0]
    publish = parser.parse_args(services["publisher"]["command"])
    assert publish.topic == topic and publish.partitions == 2
    # the snapshot service reads both states
    snapshot = services["snapshot"]
    snap_args = parser.parse_args(snapshot["command"])
    snap_mounts = dict(m.split(":")[:2][::-1] for m in snapshot["volumes"])
    read = {snap_mounts[m] for s in snap_args.state for m in snap_mounts
            if s.startswith(m + "/")}
    assert read == set(volumes.values())
    # Prometheus scrapes every consumer at its metrics port
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    (static,) = job["static_configs"]
    assert set(static["targets"]) == {f"{name}:{a.metrics_port}" for name, a in parsed.items()}
    assert set(services["prometheus"]["depends_on"]) == set(consumers)


# ------------------------------------------------------------------------------ k8s
def test_k8s_statefulset_replicas_with_static_membership_and_a_state_claim_each() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs = [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if doc]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    spec = sts["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    args = container["args"]
    (instance_id,) = _option(args, "--group-instance-id")
    var = re.fullmatch(r"\$\((\w+)\)", instance_id)
    assert var, instance_id  # expanded by the kubelet from the pod's environment
    assert env[var.group(1)]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    parsed = build_parser().parse_args(args)
    assert parsed.group_instance_id == instance_id
    # the state is on the pod's own claim (volume claim template), never a shared volume
    (template,) = spec["volumeClaimTemplates"]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert parsed.state.startswith(mounts[template["metadata"]["name"]] + "/")
    assert template["metadata"]["name"] not in {v["name"] for v in pod["volumes"]}
    # the shard backups and the shared snapshot are on claims every pod mounts (ReadWriteMany)
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    by_volume = {v["name"]: v for v in pod["volumes"]}
    by_path = {path: name for name, path in mounts.items()}
    assert parsed.snapshot_shared
    for path in (parsed.shard_backups, parsed.snapshot_dir):
        volume = by_volume[by_path[path]]
        claim = claims[volume["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], path
    # every consumer pod is scraped: the metrics service selects the pods, the pods are
    # annotated for pod discovery at the metrics port
    labels = spec["template"]["metadata"]["labels"]
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(parsed.metrics_port)
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
    assert spec["selector"]["matchLabels"].items() <= labels.items()


# ------------------------------------------------------------------------------ Grafana
@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> SimulatedSurvey:
    data = tmp_path_factory.mktemp("data")
    return simulate_survey(data / "repo", n_visits=4, seed=29, sources_per_visit=800,
                           write_refcat=False)


class _Consumer(ConsumerProcess):
    """``streamstars run --group`` with its metrics served on a free port."""

    def __init__(self, broker: TansuBroker, topic: str, state: Path, survey: SimulatedSurvey,
                 tmp: Path) -> None:
        self.port = free_port()
        config = tmp / "streamstars.toml"
        config.write_text(f"shardNside = {NSIDE}\n")
        super().__init__([*consumer_args(broker, topic, state, survey.out_dir.parent, tmp),
                          "--config", str(config), "--metrics-port", str(self.port)],
                         tmp / f"{state.name}.log")

    def metrics(self) -> str:
        try:
            status, body = http_get(self.port, "/metrics")
        except OSError:  # not serving yet
            return ""
        return body if status == 200 else ""

    def lag_partitions(self) -> set[int]:
        return {int(p) for p in re.findall(r'^streamstars_consumer_lag\{[^}]*partition="(\d+)"',
                                            self.metrics(), re.M)}

    def drained(self) -> bool:
        """Every partition it reports is at its high watermark."""
        lags = re.findall(r"^streamstars_consumer_lag\{[^}]*\} (\S+)$", self.metrics(), re.M)
        return bool(lags) and all(float(x) == 0.0 for x in lags)


def _exported(scrape: str) -> dict[str, set[str]]:
    """Series name -> label names seen, from a text exposition (families without a sample
    yet, e.g. a labelled counter never incremented, are named by their TYPE line)."""
    series: dict[str, set[str]] = {}
    for line in scrape.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names = ([f"{name}_bucket", f"{name}_sum", f"{name}_count"]
                     if kind == "histogram" else [name])
            for n in names:
                series.setdefault(n, set())
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            name = name.split()[0]
            labels = set(re.findall(r'(\w+)="', rest.split("}")[0])) if rest else set()
            series.setdefault(name, set()).update(labels)
    return series


def _declared_labels(series: str) -> set[str]:
    """The label names the consumer declares for the family of ``series`` (a labelled family
    without a sample yet shows none in a scrape)."""
    from prometheus_client.metrics import MetricWrapperBase

    from streamstars.consumers.metrics import ConsumerMetrics

    for metric in vars(ConsumerMetrics()).values():
        if isinstance(metric, MetricWrapperBase):
            family = metric.describe()[0]
            if series.removesuffix("_total") == family.name or series.rsplit("_", 1)[0] == \
                    family.name:
                return set(metric._labelnames) | ({"le"} if family.type == "histogram"
                                                  else set())
    return set()


def _dashboard_queries() -> list[str]:
    import json

    dashboard = json.loads((DEPLOY / "grafana" / "streamstars.json").read_text())
    return [target["expr"] for panel in dashboard["panels"]
            for target in panel.get("targets", [])]


def test_dashboard_queries_only_what_the_consumers_export(
        broker: TansuBroker, survey: SimulatedSurvey, tmp_path: Path) -> None:
    """Two consumers of one group (A alone first, then B joins): every metric the dashboard
    queries is a series of a real consumer's ``/metrics``, every label it groups by (but
    ``instance``, Prometheus' target label) is one of that metric's labels, and each
    partition's lag is reported by its owner only (the former owner drops the series)."""
    topic = "deploy-metrics"
    broker.create_topic(topic, partitions=2)
    broker.create_topic(f"{topic}.dead-letters", partitions=1)
    routing = ShardRouting(ShardSpec.of_config(BuildStarsConfig(shardNside=NSIDE)), partitions=2)
    summary = publish_repo(survey.out_dir, broker.bootstrap, topic, routing=routing)
    shards = {s for f in summary.footprints.values() for s in f.shards}
    assert {shard_partition(NSIDE, s, 2) for s in shards} == {0, 1}
    broker.produce(topic, [(b"64/0", b"not an event")])  # a dead letter: its counter's labels
    a = _Consumer(broker, topic, tmp_path / "A", survey, tmp_path)
    b: _Consumer | None = None
    try:
        wait_until(lambda: a.lag_partitions() == {0, 1} and a.drained()
                   and "streamstars_visits_dead_lettered_total{" in a.metrics(),
                   120, "A owns both partitions, has applied and dead-lettered")
        b = _Consumer(broker, topic, tmp_path / "B", survey, tmp_path)
        try:
            wait_until(lambda: len(a.lag_partitions()) == 1 and b is not None
                       and b.lag_partitions() == {0, 1} - a.lag_partitions(),
                       120, "one partition each, its lag reported by its owner only")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nA:\n{a.metrics()}\nB:\n{b.metrics()}") from None
        wait_until(lambda: "streamstars_visits_applied_total{" in b.metrics(), 120,
                   "B applied its partition")
        exported: dict[str, set[str]] = {}
        for consumer in (a, b):
            for name, labels in _exported(consumer.metrics()).items():
                exported.setdefault(name, set()).update(labels)
    finally:
        a.stop()
        if b is not None:
            b.stop()

    queries = _dashboard_queries()
    grouped: dict[str, set[str]] = {}
    for expr in queries:
        names = set(re.findall(r"\bstreamstars_\w+", expr))
        assert names, expr
        for name in names:
            assert name in exported, f"{name} (in {expr!r}) is not exported by the consumer"
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in (x.strip() for x in clause.split(",")):
                grouped.setdefault(label, set())
                if label == "instance":  # Prometheus' label of the scraped target
                    continue
                assert any(label in exported[n] or label in _declared_labels(n)
                           for n in names), (label, expr)
    # the per-consumer and per-partition panels
    assert "instance" in grouped and "partition" in grouped
    assert any("streamstars_visits_applied_total" in q and "by (instance)" in q
               for q in queries)
    assert any("streamstars_consumer_lag" in q and "partition" in q for q in queries)
