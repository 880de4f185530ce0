"""``wss://`` with the real router and the ``websockets`` client: the router
serves TLS itself (``--tls-cert`` / ``--tls-key``) with a certificate this
test makes with the ``openssl`` command; a Python worker answers."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import Client, Harness, running

from bridge_worker import Context, Worker

# Each test once per worker transport (conftest.py, `transport`).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("transport")]


def self_signed(dir: Path) -> tuple[Path, Path]:
    cert, key = dir / "cert.pem", dir / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_a_wss_client_is_served_over_tls(harness: Harness, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    router = harness.router("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key))
    w = Worker(["py-main"], endpoint=router.bridge, worker_id="py-tls")

    @w.handler("echo")
    async def echo(ctx: Context, data: Any) -> Any:
        return data

    context = ssl.create_default_context(cafile=str(cert))
    port = router.http.rsplit(":", 1)[1]

    async def main() -> None:
        async with running(w):
            async with Client.connect(f"wss://localhost:{port}/ws/main", ssl=context) as c:
                assert c.welcome["data"]["route"] == "/ws/main"
                done = await c.call("echo", {"pi": 3.141592653589793, "big": 2**60})
                assert done["data"] == {"pi": 3.141592653589793, "big": 2**60}
            # A client that does not trust the certificate is refused by its own TLS.
            with pytest.raises(ssl.SSLCertVerificationError):
                async with Client.connect(f"wss://localhost:{port}/ws/main", ssl=ssl.create_default_context()):
                    pass

    asyncio.run(main())
