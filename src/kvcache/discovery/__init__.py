"""Kubernetes pod discovery: dial ready engine pods, forget the ones that go away.

`Reconciler` is the pure logic (events in, connect/disconnect/forget out), `KubernetesPodSource`
the live list + watch loop that feeds it, `SubscriberTarget` the glue to the ZMQ subscriber and
the ingest pipeline. See docs/discovery.md.
"""

from kvcache.discovery.config import DiscoveryConfig, PodIdentity
from kvcache.discovery.reconciler import (
    Binding,
    DiscoveryTarget,
    PodEvent,
    PodState,
    Reconciler,
    pod_binding,
)
from kvcache.discovery.target import SubscriberTarget
from kvcache.discovery.watch import KubernetesPodSource, load_client_configuration

__all__ = [
    "Binding",
    "DiscoveryConfig",
    "DiscoveryTarget",
    "KubernetesPodSource",
    "PodEvent",
    "PodIdentity",
    "PodState",
    "Reconciler",
    "SubscriberTarget",
    "load_client_configuration",
    "pod_binding",
]
