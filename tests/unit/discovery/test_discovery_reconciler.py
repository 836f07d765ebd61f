"""The pod reconciler replaying recorded API-server watch streams (tests/data/k8s)."""

from __future__ import annotations

import pytest
from k8s_recordings import (
    EXPIRY_SCENARIO_CALLS,
    Call,
    RecordingTarget,
    dial,
    pod_events,
    pod_list,
    release,
)

from kvcache.discovery import (
    Binding,
    DiscoveryConfig,
    PodEvent,
    PodState,
    Reconciler,
    SubscriberTarget,
)
from kvcache.events.subscriber import Subscriber

LIFECYCLE_CALLS: list[Call] = [
    *dial("10.244.1.17"),  # x2kqp Ready
    *dial("10.244.3.21"),  # m8rvt Ready
    *release("10.244.1.17"),  # x2kqp fails its readiness probe
    *dial("10.244.1.17"),  # ... and recovers
    *release("10.244.1.17"),  # deletionTimestamp set while still Ready: terminating
]


def _replay(reconciler: Reconciler, events: list[PodEvent]) -> None:
    for event in events:
        reconciler.apply(event)


def _running(
    name: str, ip: str | None, *, rv: str, uid: str = "u1", ready: bool = True
) -> PodState:
    return PodState(
        namespace="llm",
        name=name,
        uid=uid,
        resource_version=rv,
        phase="Running",
        ip=ip,
        ready=ready,
    )


def test_a_pods_whole_life_connects_and_releases_it() -> None:
    target = RecordingTarget()
    reconciler = Reconciler(target)
    _replay(reconciler, pod_events("lifecycle.jsonl"))
    assert target.calls == LIFECYCLE_CALLS
    assert reconciler.bindings() == {
        "llm/vllm-llama-7d9c5b6f4-m8rvt": Binding("10.244.3.21:8000", "tcp://10.244.3.21:5557")
    }
    stats = reconciler.statistics()
    assert stats["connects"] == 3 and stats["disconnects"] == 2 and stats["forgets"] == 2
    assert stats["connected_pods"] == 1 and stats["tracked_pods"] == 1
    assert stats["stale_events"] == stats["duplicate_events"] == 0


def test_pending_pods_without_an_ip_are_not_dialled() -> None:
    target = RecordingTarget()
    reconciler = Reconciler(target)
    # The first six events: both pods created, scheduled, containers being created.
    _replay(reconciler, pod_events("lifecycle.jsonl")[:6])
    assert target.calls == []
    assert reconciler.statistics()["tracked_pods"] == 2
    # Ready and Running but (impossibly) without an IP: still nothing to dial.
    reconciler.apply(PodEvent("MODIFIED", _running("odd", None, rv="48120")))
    assert target.calls == []


def test_duplicated_events_change_nothing() -> None:
    target = RecordingTarget()
    reconciler = Reconciler(target)
    for event in pod_events("lifecycle.jsonl"):
        reconciler.apply(event)
        reconciler.apply(event)  # a watch re-delivering after a reconnect
    assert target.calls == LIFECYCLE_CALLS
    stats = reconciler.statistics()
    # Every repeat is recognised: 13 updates as duplicates, the repeated DELETED as stale.
    assert stats["duplicate_events"] == 13 and stats["stale_events"] == 1


def test_out_of_order_events_are_ignored() -> None:
    events = pod_events("lifecycle.jsonl")
    not_ready = next(i for i, e in enumerate(events) if e.pod.resource_version == "48231")
    swapped = [
        *events[:not_ready],
        events[not_ready + 1],
        events[not_ready],
        *events[not_ready + 2 :],
    ]
    target = RecordingTarget()
    reconciler = Reconciler(target)
    _replay(reconciler, swapped)
    # The late NotReady (48231) arrives after the recovery (48262): x2kqp stays connected.
    assert target.calls == [*dial("10.244.1.17"), *dial("10.244.3.21"), *release("10.244.1.17")]
    assert reconciler.statistics()["stale_events"] == 1


def test_a_late_event_about_a_deleted_pod_does_not_revive_it() -> None:
    events = pod_events("lifecycle.jsonl")
    ready_again = next(e for e in events if e.pod.resource_version == "48262")
    target = RecordingTarget()
    reconciler = Reconciler(target)
    _replay(reconciler, events)
    reconciler.apply(PodEvent("MODIFIED", ready_again.pod))
    assert target.calls == LIFECYCLE_CALLS
    assert "llm/vllm-llama-7d9c5b6f4-x2kqp" not in reconciler.bindings()


def test_statefulset_pod_recreated_on_another_node() -> None:
    target = RecordingTarget()
    reconciler = Reconciler(target)
    _replay(reconciler, pod_events("reschedule.jsonl"))
    assert target.calls == [*dial("10.244.2.9"), *release("10.244.2.9"), *dial("10.244.5.30")]


def test_recreation_seen_only_as_a_new_uid_still_releases_the_old_incarnation() -> None:
    events = pod_events("reschedule.jsonl")
    target = RecordingTarget()
    reconciler = Reconciler(target)
    # The watch missed the drain and the deletion: first and last events only.
    reconciler.apply(events[0])
    reconciler.apply(events[-1])
    assert events[0].pod.uid != events[-1].pod.uid
    assert target.calls == [*dial("10.244.2.9"), *release("10.244.2.9"), *dial("10.244.5.30")]


@pytest.mark.parametrize(
    ("identity", "old", "new"),
    [
        ("ip", "10.244.2.9", "10.244.5.30"),
        ("name", "vllm-qwen-0", "vllm-qwen-0"),
        ("namespaced_name", "llm/vllm-qwen-0", "llm/vllm-qwen-0"),
    ],
)
def test_identity_modes(identity: str, old: str, new: str) -> None:
    config = DiscoveryConfig(pod_identity=identity, socket_port=5556)  # type: ignore[arg-type]
    target = RecordingTarget()
    reconciler = Reconciler(target, config)
    _replay(reconciler, pod_events("reschedule.jsonl"))
    # Under a name identity the new pod reuses the id, yet the old entries were forgotten
    # first: the recreated engine starts with an empty cache.
    assert target.calls == [
        ("connect", old, "tcp://10.244.2.9:5556"),
        ("disconnect", old, "tcp://10.244.2.9:5556"),
        ("forget", old),
        ("connect", new, "tcp://10.244.5.30:5556"),
    ]


def test_identity_port_is_the_engines_http_port() -> None:
    target = RecordingTarget()
    reconciler = Reconciler(target, DiscoveryConfig(identity_port=8200))
    reconciler.apply(PodEvent("ADDED", _running("p", "10.1.2.3", rv="5")))
    assert target.calls == [("connect", "10.1.2.3:8200", "tcp://10.1.2.3:5557")]


def test_relist_after_410_removes_vanished_pods_and_follows_changes() -> None:
    target = RecordingTarget()
    reconciler = Reconciler(target)
    pods, version = pod_list("initial_list.json")
    reconciler.relist(pods, version)
    _replay(reconciler, pod_events("expired.jsonl"))
    pods, version = pod_list("relist_after_expiry.json")
    reconciler.relist(pods, version)
    # A watch event from before the relist, delivered late, is older than the list: ignored.
    stale = pod_events("expired.jsonl")[0]
    reconciler.apply(stale)
    _replay(reconciler, pod_events("after_relist.jsonl"))
    assert target.calls == EXPIRY_SCENARIO_CALLS
    stats = reconciler.statistics()
    assert stats["relists"] == 2 and stats["stale_events"] == 1
    assert set(reconciler.bindings()) == {
        "llm/vllm-llama-7d9c5b6f4-q7wzd",
        "llm/vllm-qwen-0",
    }


def test_relisting_the_same_snapshot_is_idempotent() -> None:
    target = RecordingTarget()
    reconciler = Reconciler(target)
    pods, version = pod_list("initial_list.json")
    reconciler.relist(pods, version)
    calls = list(target.calls)
    reconciler.relist(pods, version)
    reconciler.relist(pods, version)
    assert target.calls == calls
    assert len(calls) == 3


def test_ip_change_under_the_same_uid_moves_the_subscription() -> None:
    target = RecordingTarget()
    reconciler = Reconciler(target)
    reconciler.apply(PodEvent("ADDED", _running("p", "10.0.0.1", rv="10")))
    reconciler.apply(PodEvent("MODIFIED", _running("p", "10.0.0.2", rv="11")))
    assert target.calls == [*dial("10.0.0.1"), *release("10.0.0.1"), *dial("10.0.0.2")]


def test_two_pods_claiming_one_address_share_it_until_both_are_gone() -> None:
    target = RecordingTarget()
    reconciler = Reconciler(target)
    reconciler.apply(PodEvent("ADDED", _running("old", "10.0.0.9", rv="10", uid="a")))
    reconciler.apply(PodEvent("ADDED", _running("new", "10.0.0.9", rv="11", uid="b")))
    assert target.calls == dial("10.0.0.9")
    assert reconciler.statistics()["identity_conflicts"] == 1
    reconciler.apply(PodEvent("DELETED", _running("old", "10.0.0.9", rv="12", uid="a")))
    assert target.calls == dial("10.0.0.9")  # "new" still holds endpoint and identity
    reconciler.apply(PodEvent("DELETED", _running("new", "10.0.0.9", rv="13", uid="b")))
    assert target.calls == [*dial("10.0.0.9"), *release("10.0.0.9")]


def test_ipv6_pods() -> None:
    target = RecordingTarget()
    reconciler = Reconciler(target)
    reconciler.apply(PodEvent("ADDED", _running("p", "fd00:10:244::7", rv="3")))
    # The identity is what "$(POD_IP):8000" expands to; the endpoint is bracketed for ZMQ.
    assert target.calls == [("connect", "fd00:10:244::7:8000", "tcp://[fd00:10:244::7]:5557")]


def test_non_numeric_resource_versions_apply_in_arrival_order() -> None:
    target = RecordingTarget()
    reconciler = Reconciler(target)
    reconciler.apply(PodEvent("ADDED", _running("p", "10.0.0.1", rv="b")))
    reconciler.apply(PodEvent("MODIFIED", _running("p", "10.0.0.1", rv="a", ready=False)))
    assert target.calls == [*dial("10.0.0.1"), *release("10.0.0.1")]


def test_a_failing_target_is_counted_and_does_not_stop_reconciliation() -> None:
    class Flaky(RecordingTarget):
        def connect(self, pod_id: str, endpoint: str) -> None:
            super().connect(pod_id, endpoint)
            if pod_id.startswith("10.0.0.1:"):
                raise RuntimeError("refused")

    target = Flaky()
    reconciler = Reconciler(target)
    reconciler.apply(PodEvent("ADDED", _running("p1", "10.0.0.1", rv="1")))
    reconciler.apply(PodEvent("ADDED", _running("p2", "10.0.0.2", rv="2")))
    assert target.calls == [*dial("10.0.0.1"), *dial("10.0.0.2")]
    assert reconciler.statistics()["target_errors"] == 1


def test_subscriber_target_drives_a_real_subscriber() -> None:
    forgotten: list[str] = []
    subscriber = Subscriber(lambda frames: None, dynamic=True)
    reconciler = Reconciler(SubscriberTarget(subscriber, forgotten.append))
    pods, version = pod_list("initial_list.json")
    reconciler.relist(pods, version)
    assert set(subscriber.endpoints) == {
        "tcp://10.244.3.21:5557",
        "tcp://10.244.1.40:5557",
        "tcp://10.244.2.9:5557",
    }
    _replay(reconciler, pod_events("expired.jsonl"))
    assert "tcp://10.244.1.40:5557" not in subscriber.endpoints
    assert forgotten == ["10.244.1.40:8000"]


def test_subscriber_target_without_dialling_only_forgets() -> None:
    forgotten: list[str] = []
    subscriber = Subscriber(lambda frames: None, bind=["tcp://127.0.0.1:0"])
    reconciler = Reconciler(SubscriberTarget(subscriber, forgotten.append, dial=False))
    _replay(reconciler, pod_events("lifecycle.jsonl"))
    assert subscriber.endpoints == ()
    assert forgotten == ["10.244.1.17:8000", "10.244.1.17:8000"]
