"""Two-node tests need real PostgreSQL and Redis: under CI=true a missing service fails the run (the
`postgres_dsn` / `redis_url` fixtures, tests/services.py); locally these tests skip and say why."""

from tests.distributed.cluster import cluster  # noqa: F401
from tests.services import pg_schema, postgres_dsn, redis_url  # noqa: F401
