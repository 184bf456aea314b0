"""Fan-out between rooms: the Broker interface and its implementations, chosen by config."""

from __future__ import annotations

from collab_server.broker.base import Broker, BrokerError, Handler, Kind
from collab_server.config import Settings

__all__ = ["Broker", "BrokerError", "Handler", "Kind", "create_broker"]


def create_broker(settings: Settings) -> Broker:
    """The broker `settings.broker` names (Settings admits only "local" and "redis")."""
    if settings.broker == "redis":
        from collab_server.broker.redis import RedisBroker

        return RedisBroker(settings.redis_url, stream_ttl=settings.redis_stream_ttl)
    from collab_server.broker.local import LocalBroker

    return LocalBroker()
