"""TLS (`--ssl-certfile`, `--ssl-keyfile`): y-websocket and client_py over wss://, the HTTP API over https://, and
certificates the server cannot use refused before it starts."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from pycrdt import Doc, Text

from client_py import CollabClient
from tests.jspeer import JsPeer
from tests.serverproc import ROOT, ServerProcess, free_port, wait_until


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(server_factory, ca: trustme.CA, tmp_path: Path) -> ServerProcess:
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    return server_factory("--ssl-certfile", str(tmp_path / "cert.pem"), "--ssl-keyfile", str(tmp_path / "key.pem"),
                          ca=tmp_path / "ca.pem")


async def test_yjs_and_python_clients_edit_together_over_wss(tls_server: ServerProcess, tmp_path: Path) -> None:
    assert tls_server.ws_url.startswith("wss://")
    trusted = ssl.create_default_context(cafile=tmp_path / "ca.pem")
    async with JsPeer("node", env={"NODE_EXTRA_CA_CERTS": str(tmp_path / "ca.pem")}) as node, \
            CollabClient(tls_server.ws_url, "tls-room", ssl=trusted) as py:
        await node.connect(tls_server.ws_url, "tls-room")
        await py.synced(timeout=10)
        text = py.doc.get("text", type=Text)
        await node.call("text_insert", index=0, text="from yjs")
        await py.wait_until(lambda: str(text) == "from yjs")
        text += ", from python"
        await node.wait_for("doc.text === 'from yjs, from python'")

    async with httpx.AsyncClient(base_url=tls_server.http_url, verify=trusted, timeout=10) as http:
        got = await http.get("/api/docs/tls-room/update")
        assert got.status_code == 200
    doc = Doc()
    doc.apply_update(got.content)
    assert str(doc.get("text", type=Text)) == "from yjs, from python"

    cli = collab_client("get", tls_server.ws_url, "tls-room", env={"SSL_CERT_FILE": str(tmp_path / "ca.pem")})
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == {"blocks": {}}


async def test_plain_http_and_an_untrusted_certificate_get_nowhere(tls_server: ServerProcess) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_server.port}/health", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_server.http_url}/health", timeout=5)  # the system's authorities never signed it
    async with JsPeer("untrusting") as node:  # without NODE_EXTRA_CA_CERTS
        await node.connect(tls_server.ws_url, "tls-room", wait_synced=False)
        await node.wait_event("connection-error")
        assert not (await node.state()).synced
    cli = collab_client("--timeout", "1", "get", tls_server.ws_url, "tls-room")
    assert cli.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in cli.stderr, cli.stderr


def collab_client(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client_py.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


async def test_a_renewed_certificate_is_served_after_sighup(server_factory, tmp_path: Path) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    old_ca.cert_pem.write_to_path(tmp_path / "old-ca.pem")
    new_ca.cert_pem.write_to_path(tmp_path / "new-ca.pem")

    def trusted_by(ca: Path) -> bool:
        try:
            httpx.get(f"https://127.0.0.1:{server.port}/health", verify=ssl.create_default_context(cafile=ca),
                      timeout=5)
        except httpx.ConnectError:
            return False
        return True

    old_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "cert.pem")
    server = server_factory("--ssl-certfile", str(tmp_path / "cert.pem"), ca=tmp_path / "old-ca.pem")
    assert trusted_by(tmp_path / "old-ca.pem") and not trusted_by(tmp_path / "new-ca.pem")
    # a renewal gone wrong: the new certificate without its key (the server reads the key from cert.pem)
    new_ca.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    server.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: "tls: keeping the current certificate" in server.log())
    assert trusted_by(tmp_path / "old-ca.pem"), "a renewal the server cannot use must not stop it serving"

    new_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "cert.pem")
    server.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: trusted_by(tmp_path / "new-ca.pem"))
    assert not trusted_by(tmp_path / "old-ca.pem")
    assert "tls: certificate reloaded from" in server.log()
    assert server.alive()


def serve_with(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collab_server", "serve", "--port", str(free_port()), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_certificates_the_server_cannot_use_stop_it_with_one_line(ca: trustme.CA, tmp_path: Path) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(tmp_path / "other-key.pem")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    (tmp_path / "locked-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    cases = {
        ("--ssl-keyfile", "key.pem"): "ssl_keyfile needs ssl_certfile",
        ("--ssl-certfile", "missing.pem"): "No such file or directory",
        ("--ssl-certfile", "cert.pem"): "(no ssl_keyfile: the key must be in it)",
        ("--ssl-certfile", "cert.pem", "--ssl-keyfile", "other-key.pem"): "KEY_VALUES_MISMATCH",
        ("--ssl-certfile", "cert.pem", "--ssl-keyfile", "locked-key.pem"): "the private key is encrypted",
    }
    for args, reason in cases.items():
        done = serve_with("--db", str(tmp_path / "x.db"),
                          *(str(tmp_path / a) if a.endswith(".pem") else a for a in args))
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("collab-server: ") and reason in done.stderr, (args, done.stderr)
        assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "x.db").exists()
