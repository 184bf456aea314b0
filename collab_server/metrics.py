"""Prometheus metrics, one registry per app (so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily


class Tally:
    """A counter for the per-message paths: a plain number the event loop adds to, read when /metrics is
    scraped. prometheus_client's Counter takes a lock on every increment (~0.3 µs against ~0.04), and the
    bytes sent are counted once per message per connection."""

    __slots__ = ("name", "documentation", "value")

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _Tallies:
    """Exports tallies as Prometheus counters (`<name>_total`)."""

    def __init__(self, tallies: list[Tally]) -> None:
        self.tallies = tallies

    def collect(self) -> Iterator[CounterMetricFamily]:
        for tally in self.tallies:
            yield CounterMetricFamily(tally.name, tally.documentation, value=tally.value)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("collab_connections", "Open websocket connections", registry=r)
        self.rooms_loaded = Gauge("collab_rooms_loaded", "Documents loaded in memory", registry=r)
        self.updates_applied = Tally("collab_updates_applied", "Document changes applied and committed")
        self.updates_broadcast = Tally("collab_updates_broadcast", "Update messages queued to connections")
        self.messages_coalesced = Counter("collab_messages_coalesced", "Messages queued for backed-up peers "
                                          "that were merged into others", registry=r)
        self.bytes_received = Tally("collab_bytes_received", "Websocket payload bytes received")
        self.bytes_sent = Tally("collab_bytes_sent", "Websocket payload bytes sent")
        r.register(_Tallies([self.updates_applied, self.updates_broadcast, self.bytes_received, self.bytes_sent]))
        self.commit_seconds = Histogram(
            "collab_commit_seconds", "Latency of one group commit", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.commit_batch = Histogram("collab_commit_batch_size", "Log entries per group commit", registry=r,
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
        self.share_pauses = Counter("collab_share_pauses", "Pauses in reading a connection whose messages took more "
                                    "than its share of the event loop (--loop-share)", registry=r)
        self.resolver_actions = Counter("collab_resolver_actions", "Statuses materialised by the resolver",
                                        registry=r)
        self.resync_catch_ups = Counter("collab_resync_catch_ups", "Loaded rooms that caught up from storage "
                                        "with changes another node committed but never published", registry=r)
        self.webhooks_delivered = Counter("collab_webhooks_delivered", "Webhook events the receiver accepted",
                                          registry=r)
        self.webhook_sweeps = Counter("collab_webhook_sweeps", "Sweeps for webhook events never reported, by "
                                      "whether this node ran them or another node leads the sweep", ["by"],
                                      registry=r)
        self.versions_saved = Counter("collab_versions_saved", "Automatic versions saved", registry=r)
        self.rebuilds = Counter("collab_rebuilds", "Documents built again to cut a character beyond the BMP between "
                                "its UTF-16 units as Yjs does (each costs as much as a load)", registry=r)
        self.errors = Counter("collab_errors", "Errors by kind", ["kind"], registry=r)
        self.loop_lag = Histogram("collab_event_loop_lag_seconds", "How late a timer of the event loop fired",
                                  registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))

    def observe_commit(self, batch: int, seconds: float) -> None:
        self.commit_batch.observe(batch)
        self.commit_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
