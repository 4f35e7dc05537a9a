"""Who is calling, as gRPC tells: caller identity from the client certificate (mutual TLS) or a bearer token,
checked once per call by a `grpc.aio` server interceptor. What a caller may do, and its limits, are the core's
(`service/callers.py`); the servicer enforces them.

The interceptor cannot see the TLS peer (interceptors get only the method name and metadata), so it wraps the
handler (`interceptors.wrap_handler`) and authenticates from the handler's `ServicerContext`. The caller is
handed to the servicer in a context variable (`callers.bind_caller`): the wrapper and the handler run in the same
task.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from service.callers import CALLER, Caller, bind_caller
from service.config import AuthConfig, CallerConfig, TlsConfig
from service.errors import AgentError, Unauthenticated
from service.rpc.interceptors import WrapCache, wrap_handler


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.anonymous = Caller(config.anonymous.name, config.anonymous, "none")
        self._by_identity = {ident: c for c in config.callers for ident in c.cert_identities}
        self._by_token = {digest.lower(): c for c in config.callers for digest in c.token_sha256}
        # no certificate to read and none required: only an `authorization` header can name another caller
        self.headers_only = not self._by_identity and not config.required

    def identify(self, context: grpc.aio.ServicerContext) -> Caller:
        """The caller of this call: certificate first, then bearer token; anonymous unless auth is required."""
        # The certificate's names matter only when a caller is known by one, or to name it in a refusal. Otherwise
        # they are not read: `auth_context()` builds a dict from grpc core's properties, some 8,000 instructions.
        names = _cert_names(context) if self._by_identity or self.config.required else []
        return self.identify_by(names, context.invocation_metadata() or ())

    def identify_by(self, names: Sequence[str], metadata: Sequence[tuple[str, Any]]) -> Caller:
        """The caller from what any transport can tell: the client certificate's identities (`names`, as below)
        and the request's headers (`metadata`, lower-case names)."""
        for value in names:
            caller = self._by_identity.get(value)
            if caller is not None:
                # a token sent beside the certificate is checked too: a bad one, or one of another caller (a proxy
                # adding its own), is refused rather than ignored
                token = _bearer(metadata)
                if token is not None and self._by_bearer(token).name != caller.name:
                    raise Unauthenticated(
                        f"the bearer token names another caller than the client certificate ({value})"
                    )
                return Caller(caller.name, caller, "mtls")
        token = _bearer(metadata)
        if token is not None:
            caller = self._by_bearer(token)
            return Caller(caller.name, caller, "token")
        if self.config.required:
            if names:
                presented = names[0]
                raise Unauthenticated(f"the client certificate ({presented}) belongs to no configured caller")
            raise Unauthenticated("credentials required: a client certificate or an `authorization: Bearer` token")
        return self.anonymous

    def _by_bearer(self, token: str) -> CallerConfig:
        digest = hashlib.sha256(token.encode()).hexdigest()
        for known, caller in self._by_token.items():
            if hmac.compare_digest(known, digest):
                return caller
        raise Unauthenticated("the bearer token is not valid")


def _cert_names(context: grpc.aio.ServicerContext) -> list[str]:
    auth = context.auth_context()
    # a certificate with SANs is named by them alone: its CN counts only when it has none (RFC 6125), or a CA
    # that checks the SANs it signs but not the CN would let any holder name itself after a configured caller
    names = auth.get("x509_subject_alternative_name") or auth.get("x509_common_name") or ()
    return [n.decode(errors="replace") for n in names]


def _bearer(metadata: Sequence[tuple[str, Any]]) -> str | None:
    """The token of the call's `authorization: Bearer <token>`, None without the header. Anything else is refused:
    another scheme, no token, or more than one header (one of them may be a proxy's, and which cannot be told)."""
    header = None
    for key, value in metadata:
        if key == "authorization":
            if header is not None:
                raise Unauthenticated("more than one authorization header; send one: `Bearer <token>`")
            header = value
    if header is None:
        return None
    text = header.decode(errors="replace") if isinstance(header, bytes) else str(header)
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the authorization header must be `Bearer <token>`")
    return token


_OPEN_METHODS = ("/grpc.health.v1.Health/",)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call except health checks; UNAUTHENTICATED with a clear message otherwise."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        self._wrapped = WrapCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return self.guard(details.method, await continuation(details))

    def guard(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        """`handler` authenticating its calls first (`interceptors.Registrar` sets it at registration)."""
        if handler is None or method.startswith(_OPEN_METHODS):
            return handler
        return self._wrapped.get(method, handler, lambda: wrap_handler(handler, self._authenticate))

    def _authenticate(self, request: Any, context: grpc.aio.ServicerContext) -> AgentError | None:
        authenticator = self.authenticator
        if authenticator.headers_only:
            # The usual call (auth off, or tokens without a certificate) has no `authorization` header and is
            # anonymous: found by one loop here instead of `identify`, `identify_by` and `_bearer`'s loop, which
            # unpacks each header (a namedtuple: no fast path for that), and anonymous is not bound, since the
            # servicer's caller is anonymous when none is bound (`AgentServicer.caller`): 9,800 -> 3,600
            # instructions a call with five headers, measured alone under callgrind (grpc building them not counted).
            for header in context.invocation_metadata() or ():
                if header[0] == "authorization":
                    break
            else:
                if CALLER.get() is not None:  # a caller bound before the call's task began: replaced, as before
                    bind_caller(authenticator.anonymous)
                return None
        try:
            caller = authenticator.identify(context)
        except Unauthenticated as exc:
            return exc.with_traceback(None)  # not its frames: the call ends here
        bind_caller(caller)
        return None


def check_tls_files(tls: TlsConfig) -> None:
    """OSError saying which file is wrong when the certificate, its key or the client CA cannot serve: grpc would
    only fail to add the port, which the start reports as a port in use. An encrypted key is refused, not prompted
    for on the terminal."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:
        raise OSError(
            f"tls.cert_file {str(tls.cert_file)!r} and tls.key_file {str(tls.key_file)!r} are not a PEM certificate "
            f"chain and its unencrypted private key: {exc}"
        ) from exc
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as exc:
            raise OSError(f"tls.client_ca_file {str(tls.client_ca_file)!r} holds no PEM certificate: {exc}") from exc


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS; with a client CA, mutual TLS: grpc either requires and verifies a client certificate at the handshake or
    does not ask for one at all (no "request but verify" mode), so health checks for probes that carry no
    certificate are served on `health_listen`, a port of their own."""
    key, cert = tls.key_file.read_bytes(), tls.cert_file.read_bytes()  # a missing file: an error naming it
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    check_tls_files(tls)
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
