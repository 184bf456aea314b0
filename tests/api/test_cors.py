"""CORS (`--cors-origins`): browser pages on other origins may call the HTTP API, and only those named."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from collab_server.auth import issue_token
from collab_server.cors import parse_origins
from tests.serverproc import ROOT

APP = "https://app.example"
SECRET = "cors-secret"


def preflight(base: str, origin: str, method: str = "POST") -> httpx.Response:
    return httpx.options(f"{base}/api/docs/notes/blocks", headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type"}, timeout=10)


def test_origins_are_parsed_and_anything_else_is_refused() -> None:
    assert parse_origins("") == []
    assert parse_origins(" https://app.example , http://localhost:5173/ ,") == [APP, "http://localhost:5173"]
    assert parse_origins("*") == ["*"]
    for bad in ("app.example", "https://app.example/editor", "ftp://app.example", "https://"):
        with pytest.raises(ValueError, match="not an origin"):
            parse_origins(bad)


def test_a_bad_origin_stops_the_server_before_it_starts_with_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "collab_server", "serve", "--port", "1", "--cors-origins",
                          "https://app.example/editor"], cwd=ROOT, text=True, capture_output=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip() == ("collab-server: cors_origins: 'https://app.example/editor' is not an origin "
                                  "(scheme://host[:port], or *)")


def test_without_the_setting_no_page_elsewhere_is_let_in(server) -> None:
    assert "access-control-allow-origin" not in preflight(server.http_url, APP).headers
    got = httpx.get(f"{server.http_url}/api/docs", headers={"Origin": APP}, timeout=10)
    assert got.status_code == 200 and "access-control-allow-origin" not in got.headers


def test_a_named_origin_may_call_the_api_with_a_token_and_others_may_not(server_factory) -> None:
    server = server_factory("--cors-origins", f"{APP}, http://localhost:5173", "--auth-required",
                            "--auth-secret", SECRET)
    ok = preflight(server.http_url, APP)  # a preflight carries no token: it must pass before auth
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == APP
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in
                                                   ok.headers["access-control-allow-headers"].split(",")}
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in ok.headers

    refused = preflight(server.http_url, "https://evil.example")
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers

    token = issue_token(SECRET, prefix="")
    edit = httpx.post(f"{server.http_url}/api/docs/notes/blocks", timeout=10,
                      headers={"Origin": APP, "Authorization": f"Bearer {token}"},
                      json={"ops": [{"op": "create_block", "id": "b1", "type": "paragraph", "content": "hi"}]})
    assert edit.status_code == 200, edit.text
    assert edit.headers["access-control-allow-origin"] == APP
    # an error answer carries the header too, so the page can read why it was refused
    denied = httpx.get(f"{server.http_url}/api/docs/notes/json", headers={"Origin": APP}, timeout=10)
    assert denied.status_code in (401, 403) and denied.headers["access-control-allow-origin"] == APP
    other = httpx.get(f"{server.http_url}/api/docs/notes/json", timeout=10,
                      headers={"Origin": "https://evil.example", "Authorization": f"Bearer {token}"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_any_origin(server_factory) -> None:
    server = server_factory("--cors-origins", "*")
    ok = preflight(server.http_url, "https://anywhere.example", method="DELETE")
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "*"
    assert "DELETE" in ok.headers["access-control-allow-methods"]
