from tests.services import redis_prefix, redis_url  # noqa: F401  (real Redis for the broker suites)
