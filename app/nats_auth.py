"""How tipstream authenticates to a NATS server of the operator's (`NATS_URL`): a credentials file,
and TLS files (a CA, a client certificate), as nats-py's `connect` options. The service, `tipstream
simulate` and `tipstream users export` connect with the same ones."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import nkeys
from nats.errors import Error as NatsError

from app.settings import Settings, creds_problem, creds_user
from streams import pull
from streams.nats_tls import TlsNotOffered

T = TypeVar("T")


class NatsAuthError(ValueError):
    """A TLS file that is not what its setting says: the message names the setting and the fix."""


def _no_passphrase() -> str:
    # Without a callback, OpenSSL asks for an encrypted key's passphrase on the terminal, and the start
    # waited there for good (or failed on EOF under a supervisor).
    raise NatsAuthError("is encrypted with a passphrase, which tipstream has no setting for: write it without "
                        "one (`openssl pkey -in key.pem -out plain.pem`) and keep that file readable by this user only")


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of TIPSTREAM_NATS_TLS_CA / _CERT / _KEY, or None for none set: nats-py then
    makes the default one (the system's CAs) for a `tls://` URL."""
    ca, cert, key = settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key
    if ca is None and cert is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except ssl.SSLError as error:
        raise NatsAuthError(f"TIPSTREAM_NATS_TLS_CA={ca}: holds no CA certificate in PEM ({error.reason or error}): "
                            "name the PEM file of the CA that signed the NATS server's certificate") from None
    if cert is not None:
        named = f"TIPSTREAM_NATS_TLS_CERT={cert}" + (f" with TIPSTREAM_NATS_TLS_KEY={key}" if key is not None else "")
        try:
            context.load_cert_chain(str(cert), str(key) if key is not None else None, password=_no_passphrase)
        except NatsAuthError as error:
            raise NatsAuthError(f"{named}: the key {error}") from None
        except ssl.SSLError as error:
            raise NatsAuthError(
                f"{named}: not a client certificate and its private key in PEM ({error.reason or error}): the key "
                "goes in the certificate's file or in TIPSTREAM_NATS_TLS_KEY, and must be that certificate's") from None
    return context


class CredentialsUnusable(NatsError):
    """TIPSTREAM_NATS_CREDS, read as a connection is made, is not a whole credentials file: nothing is sent, and
    the next try reads it again."""


def _creds_read_at_each_try(path: Path) -> dict[str, Callable[..., bytes]]:
    """nats-py's `user_jwt_cb` and `signature_cb` for the credentials file `path`, read at each connection and
    reconnection, so that a rotated file is taken up without a restart. Not nats-py's own reading of it
    (`user_credentials`): a file written in place by a rotation, read half done at a reconnect (emptied, its
    JWT only), raised a TypeError out of nats-py's reconnect loop, which ended without a word and left the
    service away from NATS for good; one with its seed and no JWT was read for ever, the event loop blocked."""

    def read() -> tuple[bytes, bytes]:
        try:
            content = path.read_bytes()
        except OSError as error:
            problem = f"cannot be read ({error.strerror or error})"
        else:
            problem = creds_problem(content)
        if problem is not None:
            raise CredentialsUnusable(
                f"TIPSTREAM_NATS_CREDS={path} {problem}, read as tipstream connected to NATS: put a user's whole "
                "credentials file there (written beside it, then renamed over it, it is never seen half done); "
                "it is read again at each try")
        return creds_user(content)

    def user_jwt() -> bytes:
        return read()[0]

    def signature(nonce: str) -> bytes:
        try:
            key = nkeys.from_seed(bytearray(read()[1]))
        except nkeys.NkeysError as error:
            raise CredentialsUnusable(f"TIPSTREAM_NATS_CREDS={path}: its user NKEY seed is not one ({error!r}): put "
                                      "a user's whole credentials file there; it is read again at each try") from None
        try:
            return base64.b64encode(key.sign(nonce.encode()))
        finally:
            key.wipe()

    return {"user_jwt_cb": user_jwt, "signature_cb": signature}


def nats_options(settings: Settings) -> dict[str, Any]:
    """nats-py's `connect` options for the settings' credentials file and TLS files, each only when set."""
    options: dict[str, Any] = {}
    if settings.nats_creds is not None:
        options.update(_creds_read_at_each_try(Path(settings.nats_creds)))
    if (context := tls_context(settings)) is not None:
        options["tls"] = context
    return options


COMMAND_CONNECT_S = 5.0  # a command's wait for a connection, then for the server's greeting, each try


class NatsUnanswered(Exception):
    """No NATS server took a command's connection; the message is the last try's own error."""


async def connected_unless(connecting: Coroutine[Any, Any, T], refused: asyncio.Event) -> asyncio.Future[T]:
    """`connecting` run until it ends or `refused` is set, and returned done or cancelled. The one that
    loses is cancelled, also when the wait is (a stop signal): a connection left to itself tries again for
    as long as it was told to."""
    task = asyncio.ensure_future(connecting)
    waiting = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait((task, waiting), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return task


async def connect_for_command(url: str, auth: dict[str, Any], **options: Any) -> pull.IngestClient:
    """A command's connection (`simulate`, `users export`), with `auth` (`nats_options`): three tries,
    then NatsUnanswered saying why the last one failed. With nats-py's defaults, a nats.url left by a
    killed service was tried for two minutes, each failed try logged with a traceback, and the end
    said only "no servers available for connection", which hid a refusal's reason. A TLS handshake
    that failed (a certificate not trusted, TLS not offered for tls://) ends it at once: nats-py then
    waits for good for that connection to close before its next try, and `simulate` hung there."""
    last: list[Exception] = []
    tls_refused = asyncio.Event()

    async def quiet(error: Exception) -> None:
        last[:] = [error]
        if isinstance(error, (ssl.SSLError, TlsNotOffered)):
            tls_refused.set()

    connecting = await connected_unless(pull.connect(
        url, **auth, max_reconnect_attempts=3, reconnect_time_wait=0.5, connect_timeout=COMMAND_CONNECT_S,
        error_cb=quiet, **options), tls_refused)
    if not connecting.cancelled() and connecting.exception() is None:
        return connecting.result()
    error = None if connecting.cancelled() else connecting.exception()
    said = str(last[0] if last else error or "")
    if (fix := tls_refusal_fix(last[0] if last else None)) is not None:
        said += f" ({fix})"
    raise NatsUnanswered(said or f"no NATS greeting within {COMMAND_CONNECT_S:g} s")


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
NAME_MISMATCH = (62, 64)


# The alerts of a server that verifies its clients (`verify: true`) and will not take this one's certificate:
# none given (TLS 1.3's alert), or one it does not trust, or no longer (expired, revoked).
CLIENT_CERTIFICATE_MISSING = frozenset({"TLSV13_ALERT_CERTIFICATE_REQUIRED"})
CLIENT_CERTIFICATE_REFUSED = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_ACCESS_DENIED"})


def client_certificate_refused(error: object) -> bool:
    """Whether a TLS handshake failed on the server's refusal of the client's certificate: no retry changes
    that, as none changes a server certificate not trusted here."""
    reason = getattr(error, "reason", None) if isinstance(error, ssl.SSLError) else None
    return reason in CLIENT_CERTIFICATE_MISSING or reason in CLIENT_CERTIFICATE_REFUSED


def tls_refusal_fix(error: object) -> str | None:
    """What to do about a TLS handshake that failed (the service's start and the commands alike), or None."""
    if isinstance(error, ssl.SSLError) and error.reason in CLIENT_CERTIFICATE_MISSING:
        return ("The server verifies its clients' certificates and was given none: set TIPSTREAM_NATS_TLS_CERT "
                "(and TIPSTREAM_NATS_TLS_KEY, if the key is in a file of its own) to a client certificate signed by a "
                "CA the server trusts (its `tls {}` block's ca_file)")
    if isinstance(error, ssl.SSLError) and error.reason in CLIENT_CERTIFICATE_REFUSED:
        # Saying to set TIPSTREAM_NATS_TLS_CA sent the operator to the server's side of the handshake, which was right.
        return ("The server refused the client certificate of TIPSTREAM_NATS_TLS_CERT: set it to one signed by a CA "
                "the server trusts (its `tls {}` block's ca_file), not expired nor revoked")
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_code in NAME_MISMATCH:
        # Trusted CA and all: naming the CA setting sent the operator to a file that was right.
        return ("The server's certificate is signed by a CA trusted here, but names another host than NATS_URL's: "
                "write the host in NATS_URL as the certificate names it (its subjectAltName, which `openssl s_client "
                "-connect host:port </dev/null | openssl x509 -noout -ext subjectAltName` shows), or give the server "
                "a certificate for the name NATS_URL uses")
    if isinstance(error, ssl.SSLError):
        return ("Set TIPSTREAM_NATS_TLS_CA to the CA that signed the server's certificate, if no CA this machine "
                "trusts did (CERTIFICATE_VERIFY_FAILED), and TIPSTREAM_NATS_TLS_CERT (with _KEY) to a client "
                "certificate, if the server verifies clients (certificate required)")
    return None
