"""Connecting to NATS servers set up as operators run them, real nats-servers all: TLS, mutual TLS
and a credentials file (streams/nats_tls.py, app/nats_auth.py).

nats-py alone upgraded to TLS only on the server's `tls_required`: a `tls://` URL to a server
without TLS sent its CONNECT, credentials included, in plain text, and one to a server offering
TLS without requiring it stayed in plain text.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nkeys
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from app.nats_auth import NatsAuthError, nats_options
from app.nats_connection import NatsConnection
from app.settings import Settings
from app.start_errors import StartupError
from streams import pull
from streams.nats_tls import TlsNotOffered
from tests.conftest import (
    NatsCluster,
    NatsServer,
    account_url,
    eventually,
    free_port,
    limited_account_server,
    serve_in_process,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusted(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test CA as the one OpenSSL trusts, as an operator with a private CA sets it."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))


def start_tls_server(store: Path, ca: trustme.CA, *, required: bool,
                     verify_clients: bool = False) -> tuple[NatsServer, int]:
    """A nats-server with a certificate for 127.0.0.1, requiring TLS or only offering it, and with
    `verify_clients` a client certificate signed by `ca`; its monitoring port, whose /connz tells
    which connections are TLS."""
    store.mkdir(parents=True)
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(store / "cert.pem"))
    cert.private_key_pem.write_to_path(str(store / "key.pem"))
    ca.cert_pem.write_to_path(str(store / "ca.pem"))
    optional = "" if required else "allow_non_tls: true\n"
    verify = f', ca_file: "{store / "ca.pem"}", verify: true' if verify_clients else ""
    (store / "tls.conf").write_text(
        f'tls {{ cert_file: "{store / "cert.pem"}", key_file: "{store / "key.pem"}"{verify} }}\n{optional}')
    monitoring = free_port()
    server = NatsServer(store, args=("-c", str(store / "tls.conf"), "-m", str(monitoring)))
    server.start()
    return server, monitoring


def tls_versions(monitoring: int, name: str) -> list[str | None]:
    """The TLS version of each connection named `name`, by the server's word (None: plain text)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitoring}/connz", timeout=5) as answer:
        connections = json.load(answer).get("connections") or []
    return [c.get("tls_version") for c in connections if c.get("name") == name]


async def test_a_server_wanting_tls_before_its_greeting_is_named_as_one_in_the_start_message(
        tmp_path: Path, ca: trustme.CA) -> None:
    """nats-server's `handshake_first` sends no greeting until the client's TLS handshake, which nats-py does
    only when told: the message said what listened there was not a NATS server's client port, though it was."""
    store = tmp_path / "first"
    store.mkdir()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(store / "cert.pem"))
    cert.private_key_pem.write_to_path(str(store / "key.pem"))
    ca.cert_pem.write_to_path(str(store / "ca.pem"))
    (store / "tls.conf").write_text(
        f'tls {{ cert_file: "{store / "cert.pem"}", key_file: "{store / "key.pem"}", handshake_first: true }}\n')
    server = NatsServer(store, args=("-c", str(store / "tls.conf")))
    server.start()
    try:
        url = f"tls://127.0.0.1:{server.port}"
        settings = Settings(data_dir=tmp_path / "data", nats_url=url, nats_tls_ca=store / "ca.pem",
                            nats_connect_timeout_s=2)
        connection = NatsConnection(settings, on_reconnected=lambda: None, stopping=lambda: False, fail=print)
        with pytest.raises(StartupError) as refused:
            await connection.connect(url, None)
        assert "`handshake_first: true` (TLS before the greeting), which tipstream does not do" in str(refused.value)
    finally:
        server.stop()


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "plain", args=("--auth", "s3cret-token"))
    server.start()
    yield server
    server.stop()


class Recorder:
    """A TCP relay to `port` keeping every byte a client sent: what went over the wire in the clear."""

    def __init__(self, port: int) -> None:
        self.port, self.sent = port, bytearray()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep: bool) -> None:
            while data := await reader.read(65536):
                if keep:
                    self.sent += data
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(pipe(client_r, server_w, True), pipe(server_r, client_w, False),
                             return_exceptions=True)

    async def __aenter__(self) -> int:
        self.listener = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.listener.sockets[0].getsockname()[1]

    async def __aexit__(self, *_: object) -> None:
        self.listener.close()


@pytest.fixture
async def recorder(plain_server: NatsServer) -> AsyncIterator[Recorder]:
    yield Recorder(plain_server.port)


async def test_a_tls_url_to_a_server_without_tls_is_refused_before_its_credentials_are_sent(
        recorder: Recorder) -> None:
    async with recorder as port:
        with pytest.raises(TlsNotOffered, match=rf"asks for TLS .* server at 127\.0\.0\.1:{port} offers none"):
            await pull.connect(f"tls://s3cret-token@127.0.0.1:{port}", allow_reconnect=False, connect_timeout=5)
        assert b"CONNECT" not in recorder.sent and b"s3cret" not in recorder.sent
        # The same relay, in plain text by the URL's own word: it records what a client sends.
        plain = await pull.connect(f"nats://s3cret-token@127.0.0.1:{port}", allow_reconnect=False)
        await plain.close()
        assert b"CONNECT" in recorder.sent and b"s3cret-token" in recorder.sent


async def test_a_tls_url_to_a_server_offering_tls_without_requiring_it_is_upgraded(
        tmp_path: Path, ca: trustme.CA, trusted: None) -> None:
    server, monitoring = start_tls_server(tmp_path / "optional", ca, required=False)
    try:
        secure = await pull.connect(f"tls://127.0.0.1:{server.port}", name="secure", allow_reconnect=False)
        plain = await nats.connect(f"nats://127.0.0.1:{server.port}", name="plain", allow_reconnect=False)
        try:
            assert [v is not None and v.startswith("1.") for v in tls_versions(monitoring, "secure")] == [True]
            assert tls_versions(monitoring, "plain") == [None]  # the server's word tells the two apart
        finally:
            await secure.close()
            await plain.close()
    finally:
        server.stop()


async def test_the_servers_max_payload_is_read_again_over_tls_without_a_failed_handshake_in_its_log(
        tmp_path: Path, ca: trustme.CA, trusted: None) -> None:
    """The decision publisher reads the server's max_payload again from its greeting to a connection of its own
    (`IngestClient.max_payload_now`: a reload of its configuration tells the connections it has nothing). A server
    requiring TLS logged that connection, closed after the greeting, as a failed TLS handshake ('TLS handshake
    error: EOF', an error line every look): the handshake is completed first."""
    server, _ = start_tls_server(tmp_path / "required", ca, required=True)
    try:
        nc = await pull.connect(f"tls://127.0.0.1:{server.port}", allow_reconnect=False)
        try:
            log = server.store / "server.log"
            errors = log.read_text().count("TLS handshake error")  # NatsServer.start's look at the port is one
            assert await nc.max_payload_now() == nc.max_payload == 1 << 20
            # A connection closed after the greeting, after the look's: its line is logged after the look's would be.
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            marker = f"127.0.0.1:{writer.get_extra_info('sockname')[1]} - "
            writer.close()
            await eventually(lambda: marker in log.read_text())
            assert log.read_text().count("TLS handshake error") == errors + 1, log.read_text()[-500:]
        finally:
            await nc.close()
    finally:
        server.stop()


async def test_an_accounts_max_payload_below_the_servers_is_kept_when_the_servers_is_read_again(tmp_path: Path) -> None:
    """An account's (or user's) max_payload below the server's is told in the INFO after CONNECT, which nats-py
    did not take: it kept the server's, from the greeting, and a decision between the two closed the connection
    ('Maximum Payload Violation'). The decision publisher reads the server's greeting again (a reload tells a
    connection nothing): the same max_payload as this connection's greeting, no reload, the account's stays."""
    server = limited_account_server(tmp_path / "accounts", "", account="limits: { max_payload: 8KB }")
    server.start()
    try:
        nc = await pull.connect(account_url(server), allow_reconnect=False)
        try:
            await nc.flush()
            assert nc.max_payload == 8_192, "the account's, from the INFO after CONNECT"
            assert await nc.max_payload_now() == 8_192, "the server's 1 MB is not this connection's"
        finally:
            await nc.close()
    finally:
        server.stop()


async def test_the_service_runs_over_tls_to_a_server_that_requires_it_and_reconnects_over_tls(
        tmp_path: Path, ca: trustme.CA, trusted: None, caplog: pytest.LogCaptureFixture) -> None:
    server, monitoring = start_tls_server(tmp_path / "required", ca, required=True)
    try:
        running = await serve_in_process(data_dir=tmp_path / "data", nats_url=f"tls://127.0.0.1:{server.port}")
        try:
            async with running.http() as http:
                answer = await http.post("/score", json={"user_id": "u-1", "candidates": [{"tip_id": "t-1"}]})
            assert answer.status_code == 200, answer.text
            assert [v is not None for v in tls_versions(monitoring, "tipstream")] == [True]
            nc = running.service.nc
            reconnects = nc.stats["reconnects"]
            server.stop()
            server.start()
            await eventually(lambda: nc.stats["reconnects"] > reconnects and nc.is_connected)
            assert [v is not None for v in tls_versions(monitoring, "tipstream")] == [True]
            # asyncio's warning at a TLS server's end of the connection, filtered (streams/nats_tls.py).
            assert not [r for r in caplog.records if r.name == "asyncio" and "eof_received" in r.getMessage()]
        finally:
            await running.stop()
    finally:
        server.stop()


def client_files(ca: trustme.CA, where: Path) -> dict[str, Path]:
    """A client certificate and its key signed by `ca`, and `ca` itself, as PEM files."""
    where.mkdir(parents=True, exist_ok=True)
    client = ca.issue_cert("tipstream@example.com")
    client.cert_chain_pems[0].write_to_path(str(where / "client.pem"))
    client.private_key_pem.write_to_path(str(where / "client.key"))
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    return {"ca": where / "ca.pem", "cert": where / "client.pem", "key": where / "client.key"}


async def test_a_client_certificate_and_a_private_ca_reach_a_server_that_verifies_clients(
        tmp_path: Path, ca: trustme.CA) -> None:
    """A nats:// URL with TLS files is TLS too, checked against TIPSTREAM_NATS_TLS_CA, not the system's CAs."""
    server, monitoring = start_tls_server(tmp_path / "mtls", ca, required=True, verify_clients=True)
    files = client_files(ca, tmp_path / "client")
    url = f"nats://127.0.0.1:{server.port}"
    try:
        settings = Settings(nats_url=url, nats_tls_ca=files["ca"], nats_tls_cert=files["cert"],
                            nats_tls_key=files["key"])
        client = await pull.connect(url, **nats_options(settings), name="mtls", allow_reconnect=False)
        try:
            assert [v is not None for v in tls_versions(monitoring, "mtls")] == [True]
        finally:
            await client.close()
        # The server's check of the client is real: without the certificate, it refuses the handshake.
        without = Settings(nats_url=url, nats_tls_ca=files["ca"])
        with pytest.raises(OSError):  # its alert (an SSLError), or the reset that may reach the client first
            await pull.connect(url, **nats_options(without), allow_reconnect=False, connect_timeout=5)
    finally:
        server.stop()


def test_tls_files_that_are_not_what_their_setting_says_are_a_message_naming_it(
        tmp_path: Path, ca: trustme.CA) -> None:
    files = client_files(ca, tmp_path)
    url = "nats://127.0.0.1:4222"
    with pytest.raises(NatsAuthError, match=r"^TIPSTREAM_NATS_TLS_CA=.*: holds no CA certificate in PEM"):
        nats_options(Settings(nats_url=url, nats_tls_ca=files["key"]))
    other = client_files(trustme.CA(), tmp_path / "other")
    with pytest.raises(NatsAuthError, match=r"with TIPSTREAM_NATS_TLS_KEY=.*must be that certificate's"):
        nats_options(Settings(nats_url=url, nats_tls_cert=files["cert"], nats_tls_key=other["key"]))
    # An encrypted key: OpenSSL asked for its passphrase on the terminal, and the start waited there.
    key = serialization.load_pem_private_key(files["key"].read_bytes(), password=None)
    (tmp_path / "locked.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(NatsAuthError, match=r"the key is encrypted with a passphrase.*openssl pkey"):
        nats_options(Settings(nats_url=url, nats_tls_cert=files["cert"], nats_tls_key=tmp_path / "locked.key"))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


JWT_HEADER = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats_claims: dict[str, object],
         expires: int | None = None) -> str:
    """A NATS JWT (v2) as `nsc` signs one: ed25519 by the issuer's NKEY; `expires`, its `exp` (epoch seconds)."""
    claims = {"jti": _b64(os.urandom(24)), "iat": int(time.time()), "iss": issuer.public_key.decode(),
              "sub": subject, "name": name, "nats": {**nats_claims, "version": 2}}
    if expires is not None:
        claims["exp"] = expires
    signed = f"{JWT_HEADER}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def operator_mode_server(store: Path, user_expires: int | None = None) -> tuple[NatsServer, Path]:
    """A nats-server in operator mode (decentralised JWT auth, as Synadia Cloud and `nsc` set up), with
    one JetStream account, and a credentials file for a user of it (whose JWT expires at `user_expires`)."""
    def key(prefix: int) -> nkeys.KeyPair:
        return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))

    operator, system, account = key(nkeys.PREFIX_BYTE_OPERATOR), key(nkeys.PREFIX_BYTE_ACCOUNT), key(
        nkeys.PREFIX_BYTE_ACCOUNT)
    user = key(nkeys.PREFIX_BYTE_USER)
    unlimited = {k: -1 for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf", "mem_storage",
                                  "disk_storage", "streams", "consumer")}
    accounts = {system.public_key.decode(): _jwt(operator, system.public_key.decode(), "SYS", {"type": "account"}),
                account.public_key.decode(): _jwt(operator, account.public_key.decode(), "APP",
                                                  {"type": "account", "limits": unlimited})}
    store.mkdir(parents=True)
    preload = ", ".join(f"{k}: {v}" for k, v in accounts.items())
    (store / "operator.conf").write_text(
        f"operator: {_jwt(operator, operator.public_key.decode(), 'OP', {'type': 'operator'})}\n"
        f"system_account: {system.public_key.decode()}\nresolver: MEMORY\nresolver_preload: {{ {preload} }}\n")
    user_jwt = _jwt(account, user.public_key.decode(), "tipstream", {"type": "user", "subs": -1, "data": -1,
                                                                     "payload": -1}, user_expires)
    (store / "tipstream.creds").write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n")
    return NatsServer(store, args=("-c", str(store / "operator.conf"))), store / "tipstream.creds"


async def test_the_service_runs_on_an_operator_mode_server_with_a_credentials_file(tmp_path: Path) -> None:
    server, creds = operator_mode_server(tmp_path / "operator")
    server.start()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):  # the server asks for the JWT
            await pull.connect(server.url, allow_reconnect=False, connect_timeout=5)
        running = await serve_in_process(data_dir=tmp_path / "data", nats_url=server.url, nats_creds=creds)
        try:
            async with running.http() as http:
                answer = await http.post("/score", json={"user_id": "u-1", "candidates": [{"tip_id": "t-1"}]})
            assert answer.status_code == 200, answer.text
            js = running.service.nc.jetstream()
            await eventually(lambda: running.service.publisher.published >= 1)
            assert (await js.stream_info("DECISIONS")).state.messages == 1
        finally:
            await running.stop()
    finally:
        server.stop()



@pytest.mark.parametrize("written", ["", "jwt"], ids=["emptied", "its-jwt-only"])
async def test_a_credentials_file_half_written_at_a_reconnect_is_told_and_taken_up_once_whole(
        tmp_path: Path, written: str, caplog: pytest.LogCaptureFixture) -> None:
    """TIPSTREAM_NATS_CREDS is read again at each reconnect, so a rotation that writes the file in place is
    seen half done (emptied, its JWT only). nats-py read it there itself: its signing raised a TypeError out
    of its reconnect loop, which died without a word, the callbacks never called, and the service stayed away
    from NATS for good, the whole file back or not (a file with the seed alone spun its reader for ever, the
    event loop blocked). Read by tipstream, it is told naming the setting and tried again until whole."""
    server, creds = operator_mode_server(tmp_path / "operator")
    server.start()
    try:
        running = await serve_in_process(data_dir=tmp_path / "data", nats_url=server.url, nats_creds=creds)
        service = running.service
        try:
            await eventually(lambda: service.ready, timeout=20)
            whole = creds.read_text()
            creds.write_text(whole.split("\n\n")[0] + "\n" if written else "")
            with caplog.at_level("WARNING", logger="tipstream"):
                server.stop()
                server.start()
                await eventually(lambda: any("TIPSTREAM_NATS_CREDS" in r.getMessage() and "not a NATS credentials file"
                                             in r.getMessage() for r in caplog.records), timeout=15)
            assert not service.nc.is_connected and not service.ready and service.fatal is None
            creds.write_text(whole)
            await eventually(lambda: service.ready, timeout=20)
        finally:
            await running.stop()
    finally:
        server.stop()


async def test_a_credentials_file_emptied_after_the_settings_read_it_is_a_start_message_naming_it(
        tmp_path: Path) -> None:
    """Whole when the settings checked it, emptied by the time the connection reads it: the start's message says
    what the file lacks and to put it back whole, not to start NATS there."""
    server, creds = operator_mode_server(tmp_path / "operator")
    server.start()
    try:
        settings = Settings(data_dir=tmp_path / "data", nats_url=server.url, nats_creds=creds,
                            nats_connect_timeout_s=1)
        creds.write_text("")
        connection = NatsConnection(settings, on_reconnected=lambda: None, stopping=lambda: False, fail=print)
        with pytest.raises(StartupError) as raised:
            await connection.connect(server.url, None)
        assert "is not a NATS credentials file: it has no user JWT" in str(raised.value)
        assert "Put a user's whole credentials file at TIPSTREAM_NATS_CREDS" in str(raised.value)
        assert "Start NATS" not in str(raised.value)
    finally:
        server.stop()


async def test_a_user_jwt_expiring_under_a_running_service_stops_it_naming_the_credentials_file(
        tmp_path: Path) -> None:
    """The server ends the connection of a user whose JWT has expired, and nats-py closes it for good: the
    service stops (exit code 1), and its message said to fix NATS_URL, which held no credentials."""
    server, creds = operator_mode_server(tmp_path / "operator", user_expires=int(time.time()) + 3)
    server.start()
    try:
        settings = Settings(data_dir=tmp_path / "data", nats_url=server.url, nats_creds=creds)
        told: list[str] = []
        connection = NatsConnection(settings, on_reconnected=lambda: None, stopping=lambda: False, fail=told.append)
        client = await connection.connect(server.url, None)
        try:
            await eventually(lambda: told, timeout=15)
            assert "user authentication expired" in told[0] and "exit code 1" in told[0]
            assert f"TIPSTREAM_NATS_CREDS={creds}" in told[0] and "NATS_URL first" not in told[0], told[0]
        finally:
            await client.close()
    finally:
        server.stop()


async def test_a_node_lost_hands_the_urls_credentials_to_the_nodes_the_cluster_announced(tmp_path: Path) -> None:
    """The nodes a cluster announces (INFO's connect_urls) joined nats-py's pool without the user and password
    NATS_URL gives: a reconnect to one was refused ('Authorization Violation', logged as credentials changed by
    a reload), and with NATS_URL naming one node, its loss left the service without NATS until it was back."""
    cluster = NatsCluster(tmp_path / "cluster", args=("--user", "t", "--pass", "s3cret"))
    cluster.start()
    try:
        first, *others = cluster.nodes.values()
        urls = [f"nats://t:s3cret@127.0.0.1:{node.port}" for node in cluster.nodes.values()]
        # Every node named: the ones announced are those, not three more without the credentials.
        client = await pull.connect(",".join(urls), max_reconnect_attempts=1)
        try:
            await eventually(lambda: client._server_info.get("connect_urls"))
            assert sorted((u.port, u.username or "") for u in client.servers) == sorted((n.port, "t") for n in cluster.nodes.values())
        finally:
            await client.close()

        errors: list[str] = []
        reconnected = asyncio.Event()

        async def on_error(error: Exception) -> None:
            errors.append(str(error))

        async def on_reconnected() -> None:
            reconnected.set()

        client = await pull.connect(urls[0], max_reconnect_attempts=-1, reconnect_time_wait=0.1, error_cb=on_error,
                                    reconnected_cb=on_reconnected)
        try:
            await eventually(lambda: len(client.servers) == 3)
            first.kill()
            await asyncio.wait_for(reconnected.wait(), 15)
            assert client.connected_url is not None and client.connected_url.port in {n.port for n in others}
            assert not [e for e in errors if "Authorization" in e], errors
            # The nodes announced again at the reconnect's greeting are the ones held, not more of them.
            assert sorted((u.port, u.username) for u in client.servers) == sorted((n.port, "t") for n in cluster.nodes.values())
        finally:
            await client.close()
    finally:
        cluster.stop()


async def test_a_wait_for_nats_given_up_ends_though_nats_py_swallowed_the_cancellation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-py's connect loop can lose a cancellation (Python 3.11's wait_for around its reads; its `_close` catching
    CancelledError) and, told to try for ever (max_reconnect_attempts=-1), tries on: the start's wait for NATS,
    given up at TIPSTREAM_NATS_CONNECT_TIMEOUT_S or on a TLS refusal, then waited for it without end (a
    server that refused the client certificate: no message, SIGTERM's stop waiting too, once in 6 starts)."""
    tries = 0

    async def connect_losing_one_cancellation(self: pull.IngestClient, *_: object, **__: object) -> None:
        nonlocal tries
        lost = False
        while True:
            tries += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost = True  # as nats-py: the loop goes on

    monkeypatch.setattr(pull.IngestClient, "connect", connect_losing_one_cancellation)
    waiting = asyncio.ensure_future(asyncio.wait_for(pull.connect("nats://127.0.0.1:4222"), 0.1))
    done, _ = await asyncio.wait({waiting}, timeout=5)
    for _ in range(3):  # not left behind when the wait did not end
        waiting.cancel()
        await asyncio.sleep(0.02)
    assert done and isinstance(waiting.exception(), TimeoutError), "the wait for NATS never ended"
