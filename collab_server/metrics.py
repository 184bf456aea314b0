"""Prometheus metrics, one registry per app (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("collab_connections", "Open websocket connections", registry=r)
        self.rooms_loaded = Gauge("collab_rooms_loaded", "Documents loaded in memory", registry=r)
        self.updates_applied = Counter("collab_updates_applied", "Document changes applied and committed",
                                       registry=r)
        self.updates_broadcast = Counter("collab_updates_broadcast",
                                         "Update messages queued to connections", registry=r)
        self.messages_coalesced = Counter("collab_messages_coalesced", "Messages queued for backed-up peers "
                                          "that were merged into others", registry=r)
        self.bytes_received = Counter("collab_bytes_received", "Websocket payload bytes received", registry=r)
        self.bytes_sent = Counter("collab_bytes_sent", "Websocket payload bytes sent", registry=r)
        self.commit_seconds = Histogram(
            "collab_commit_seconds", "Latency of one group commit", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.commit_batch = Histogram("collab_commit_batch_size", "Log entries per group commit", registry=r,
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
        self.resolver_actions = Counter("collab_resolver_actions", "Statuses materialised by the resolver",
                                        registry=r)
        self.resync_catch_ups = Counter("collab_resync_catch_ups", "Loaded rooms that caught up from storage "
                                        "with changes another node committed but never published", registry=r)
        self.webhooks_delivered = Counter("collab_webhooks_delivered", "Webhook events the receiver accepted",
                                          registry=r)
        self.versions_saved = Counter("collab_versions_saved", "Automatic versions saved", registry=r)
        self.errors = Counter("collab_errors", "Errors by kind", ["kind"], registry=r)

    def observe_commit(self, batch: int, seconds: float) -> None:
        self.commit_batch.observe(batch)
        self.commit_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
