"""The web demo in real headless Chromium against our server (tests/browser/demo.spec.mjs does the driving).

Needs node_modules (playwright-core) and Debian's Chromium at /usr/bin/chromium (`make install-browser`);
without them the tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme

from collab_server.auth import issue_token
from tests.serverproc import ROOT

SECRET = "browser-secret"

SPEC = ROOT / "tests" / "browser" / "demo.spec.mjs"
DEMO = ROOT / "web_demo"
DIST_INDEX = DEMO / "dist" / "index.html"
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))

pytestmark = pytest.mark.browser


def _require(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


def _demo_is_stale() -> bool:
    if not DIST_INDEX.exists():
        return True
    built = DIST_INDEX.stat().st_mtime
    sources = [DEMO / "build.mjs", DEMO / "index.html", *(DEMO / "src").rglob("*")]
    return any(path.stat().st_mtime > built for path in sources)


@pytest.fixture(scope="session")
def demo_dist() -> Path:
    """web_demo/dist, (re)built if older than its sources. Session-scoped, so it exists before `server` starts
    (the server only mounts the demo directory if it exists at startup)."""
    _require(shutil.which("node") is not None, "node is not installed")
    _require((ROOT / "node_modules" / "playwright-core").is_dir(), "node_modules missing (make install-js)")
    _require(CHROMIUM.exists(), f"{CHROMIUM} missing (make install-browser)")
    if _demo_is_stale():
        subprocess.run(["node", str(DEMO / "build.mjs")], cwd=ROOT, check=True, timeout=120)
    return DIST_INDEX.parent


@pytest.mark.timeout(180)
@pytest.mark.parametrize("scenario", ["concurrent-typing", "offline-reload", "presence-reconnect", "status-conflict",
                                      "deleted", "versions"])
def test_web_demo(demo_dist, server, scenario):
    assert "collab demo" in _get(server.http_url + "/"), "server does not serve web_demo/dist at /"
    result = subprocess.run(["node", str(SPEC), server.http_url, scenario], cwd=ROOT,
                            capture_output=True, text=True, timeout=150)
    print(result.stdout, result.stderr, sep="\n")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- server log ---\n{server.log()[-5000:]}"
    assert f"ok - {scenario}" in result.stdout


@pytest.mark.timeout(180)
def test_web_demo_with_access_tokens(demo_dist, server_factory):
    """With --auth-required the page passes ?token= on: a read-write user edits, a read-only one watches."""
    server = server_factory("--auth-required", "--auth-secret", SECRET)
    env = {**os.environ, "RW_TOKEN": issue_token(SECRET, prefix=""),
           "RO_TOKEN": issue_token(SECRET, prefix="", access="ro")}
    result = subprocess.run(["node", str(SPEC), server.http_url, "read-only"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=150)
    print(result.stdout, result.stderr, sep="\n")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- server log ---\n{server.log()[-5000:]}"
    assert "ok - read-only" in result.stdout


def _get(url: str) -> str:
    import httpx

    response = httpx.get(url, timeout=5.0)
    response.raise_for_status()
    return response.text


@pytest.mark.timeout(120)
def test_a_page_elsewhere_uses_the_http_api_only_where_its_origin_is_allowed(demo_dist, server, server_factory,
                                                                            tmp_path):
    """Real Chromium enforces CORS: its page on `server` edits through a server started with --cors-origins naming
    that origin, and a page on that server's origin is refused by `server`, which names none."""
    allowing = server_factory("--cors-origins", server.http_url, db=tmp_path / "allowing.db")
    result = subprocess.run(["node", str(SPEC), server.http_url, "cross-origin-api"], cwd=ROOT,
                            env={**os.environ, "CORS_API": allowing.http_url},
                            capture_output=True, text=True, timeout=100)
    print(result.stdout, result.stderr, sep="\n")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "ok - cross-origin-api" in result.stdout


@pytest.mark.timeout(120)
def test_the_web_demo_over_https_connects_over_wss(demo_dist, server_factory, tmp_path):
    """Served by a server with --ssl-certfile, the page connects its websocket over wss:// (that port speaks nothing
    else) and two users converge."""
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server = server_factory("--ssl-certfile", str(tmp_path / "server.pem"), ca=tmp_path / "ca.pem")
    assert server.http_url.startswith("https://")
    result = subprocess.run(["node", str(SPEC), server.http_url, "concurrent-typing"], cwd=ROOT,
                            env={**os.environ, "NODE_EXTRA_CA_CERTS": str(tmp_path / "ca.pem")},
                            capture_output=True, text=True, timeout=100)
    print(result.stdout, result.stderr, sep="\n")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- server log ---\n{server.log()[-5000:]}"
    assert "ok - concurrent-typing" in result.stdout
