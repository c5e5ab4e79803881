"""Listeners of a real relay on loopback: the certificate chain a client is sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from relayd.msrp.client import MSRPClientError, connect
from relayd.testing import (
    IntermediatePKI,
    make_intermediate_pki,
    prepared_relay,
    relay_config_overrides,
    relay_service,
    write_users,
)

from .conftest import REALM, USERS

pytestmark = pytest.mark.integration


async def start(tmp_path: Path, pki: IntermediatePKI, extra_chain: bool) -> tuple[Any, str]:
    listen = f"ssl:0:interface=127.0.0.1:certKey={pki.leaf_path}:privateKey={pki.key_path}"
    if extra_chain:
        listen += f":extraCertChain={pki.intermediate_path}"
    users = write_users(tmp_path / "users.htdigest", REALM, USERS)
    overrides = relay_config_overrides(
        str(tmp_path / "data"),
        "127.0.0.1",
        pki.leaf_path,
        pki.key_path,
        users,
        extra={("msrp", "listen"): listen},
    )
    service = relay_service(prepared_relay(overrides), reactor)
    service.startService()
    ports = await service.getServiceNamed("msrp").listening
    return service, f"msrps://127.0.0.1:{ports[0].getHost().port};tcp"


@pytest_twisted.ensureDeferred
async def test_client_trusting_only_the_root_verifies_through_extra_cert_chain(
    tmp_path: Path,
) -> None:
    pki = make_intermediate_pki(tmp_path / "pki", "127.0.0.1")
    service, uri = await start(tmp_path, pki, extra_chain=True)
    try:
        client = await connect(reactor, uri, pki.root_pem, timeout_seconds=5)
        transport: Any = client.transport
        assert transport.getPeerCertificate() is not None
        transport.loseConnection()
        await client.lost
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_without_extra_cert_chain_the_same_client_cannot_verify(tmp_path: Path) -> None:
    pki = make_intermediate_pki(tmp_path / "pki", "127.0.0.1")
    service, uri = await start(tmp_path, pki, extra_chain=False)
    try:
        with pytest.raises(MSRPClientError, match="certificate verify failed"):
            await connect(reactor, uri, pki.root_pem, timeout_seconds=5)
    finally:
        await service.stopService()
