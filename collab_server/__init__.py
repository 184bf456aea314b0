"""A Yjs-compatible, offline-first collaboration backend: y-websocket protocol, durable update log."""

from collab_server.app import create_app
from collab_server.config import Settings

__all__ = ["Settings", "create_app"]
