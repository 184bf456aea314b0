"""Schemathesis: every documented operation, fed generated (valid and invalid) input, behaves as its spec says."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from pycrdt import Doc, Text

from collab_server.openapi import openapi_spec
from tests.serverproc import ServerProcess

schema = schemathesis.openapi.from_dict(openapi_spec())


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for every operation, seeded with short names so generated requests also reach 200s."""
    server = ServerProcess(tmp_path_factory.mktemp("openapi") / "collab.db").start()
    doc = Doc()
    doc.get("t", type=Text).insert(0, "seed")
    for name in ("a", "0", "seed/doc"):
        httpx.post(f"{server.http_url}/api/docs/{name}/update", content=doc.get_update()).raise_for_status()
    yield server
    server.stop()


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_spec(case: schemathesis.Case, api_server: ServerProcess) -> None:
    # No schema can say "a valid Yjs update / state vector": schema-valid bytes there are rightly rejected with 400.
    opaque = case.operation.path.endswith("/update")
    case.call_and_validate(base_url=api_server.http_url,
                           excluded_checks=[schemathesis.checks.positive_data_acceptance] if opaque else [])


def test_served_spec_covers_every_api_route(api_server: ServerProcess) -> None:
    spec = httpx.get(f"{api_server.http_url}/api/openapi.json").json()
    assert spec == openapi_spec()
    assert set(spec["paths"]) == {"/api/openapi.json", "/api/docs", "/api/docs/{name}", "/api/docs/{name}/json",
                                  "/api/docs/{name}/update", "/api/docs/{name}/blocks", "/api/docs/{name}/copy",
                                  "/api/docs/{name}/presence",
                                  "/api/docs/{name}/versions", "/api/docs/{name}/versions/{version}",
                                  "/api/docs/{name}/versions/{version}/restore",
                                  "/api/docs/{name}/history",
                                  "/api/docs/{name}/at/{seq}"}
