"""Asyncio y-websocket client for scripts, bots and tests: offline-first, reconnecting, no echo."""

from client_py.awareness import Awareness
from client_py.backoff import Backoff
from client_py.client import REMOTE, STORE, CollabClient, DocumentDeleted, ServerClosed
from client_py.store import LocalStore, StoreError

__all__ = ["REMOTE", "STORE", "Awareness", "Backoff", "CollabClient", "DocumentDeleted", "LocalStore", "ServerClosed",
           "StoreError"]
