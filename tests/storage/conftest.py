from tests.services import pg_schema, postgres_dsn  # noqa: F401  (real PostgreSQL for the store suites)
