"""`hpsearch storage-proxy`'s gRPC server with TLS and a token, and the client that reaches it.

The proxy is Optuna's storage service (its parts through `_compat`), and hpsearch's worker
methods (`_proxy_methods`), on a gRPC server that checks the token on every call of either
(`TokenCheck`: a call without it, or with another, is UNAUTHENTICATED and reaches no storage
method) and serves TLS when given a certificate. A client reaches ``grpcs://host:port`` over
TLS (the server checked against $HPSEARCH_TLS_CA, else the system's CAs) or
``grpc://host:port`` in the clear, and sends $HPSEARCH_TOKEN with every call. A client opened
with heartbeats (a worker's) is Optuna's client with hpsearch's worker methods
(`_proxy_client`), all over one channel.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from search._auth import TOKEN_ENV, Serving, client_ca, client_token, same_token
from search._errors import SpecError, StorageError
from search.storage._compat import add_storage_service, grpc_proxy_client, ping_proxy
from search.storage._proxy_client import WorkerMethods

if TYPE_CHECKING:
    import grpc

AUTH_KEY = "authorization"  # the metadata a client's token travels in: "Bearer <token>"
_OPTIONS = [("grpc.max_receive_message_length", -1)]  # as Optuna's own channel
# The server's threads. A call past them waits in gRPC's queue, none is refused. The database
# work is bounded by the proxy's connection pool (`_open.engine_kwargs`: 6), and a study's
# starts and scans by its budget lock (one thread at a time, at most `LOCK_WAITERS` waiting:
# `_proxy_methods`): the other threads keep heartbeats, reports and tells flowing.
SERVER_THREADS = 16


class QueuedPool(ThreadPoolExecutor):
    """The server's threads, which know how long the oldest call still waiting for one has
    waited (`oldest_wait`): the proxy's own delay, which it does not count against a worker's
    heartbeats (`_proxy_methods`). Calls start in the order they came (one FIFO queue)."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers)
        self._waiting: collections.deque[float] = collections.deque()  # submit times, in order
        self._guard = threading.Lock()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        with self._guard:
            self._waiting.append(time.monotonic())
        return super().submit(self._started, fn, *args, **kwargs)

    def _started(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self._guard:
            if self._waiting:
                self._waiting.popleft()
        return fn(*args, **kwargs)

    def oldest_wait(self) -> float:
        with self._guard:
            return time.monotonic() - self._waiting[0] if self._waiting else 0.0


def _token_check_class() -> type:
    import grpc

    class TokenCheck(grpc.ServerInterceptor):
        """Lets a call through only with the token; any other is UNAUTHENTICATED."""

        def __init__(self, token: str) -> None:
            self.token = token

            def refuse(request: Any, context: grpc.ServicerContext) -> None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"this storage proxy needs its token (${TOKEN_ENV})")

            self.refused = grpc.unary_unary_rpc_method_handler(refuse)

        def intercept_service(self, continuation: Any, details: Any) -> Any:
            sent = dict(details.invocation_metadata or ()).get(AUTH_KEY, "")
            given = sent[len("Bearer "):] if sent.startswith("Bearer ") else None
            if same_token(given, self.token):
                return continuation(details)
            return self.refused

    return TokenCheck


def proxy_server(storage: Any, serving: Serving, port: int,
                 pool: ThreadPoolExecutor | None = None) -> grpc.Server:
    """The proxy's gRPC server for `storage` (not started) on `pool`'s threads (SERVER_THREADS
    of its own if None): TLS with a certificate, the token checked on every call when there is
    one."""
    import grpc

    interceptors = [_token_check_class()(serving.token)] if serving.token else []
    server = grpc.server(pool or ThreadPoolExecutor(max_workers=SERVER_THREADS),
                         interceptors=interceptors)
    add_storage_service(server, storage)
    address = f"{serving.host}:{port}"
    if serving.tls:
        credentials = grpc.ssl_server_credentials([(serving.key, serving.cert)])
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise StorageError(f"storage-proxy: cannot listen on {address} (in use?)")
    return server


def _with_token(token: str) -> Any:
    import grpc

    class WithToken(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            metadata = [*(details.metadata or ()), (AUTH_KEY, f"Bearer {token}")]
            return continuation(details._replace(metadata=metadata), request)

    return WithToken()


def open_proxy(url: str, *, heartbeat_interval: int | None = None,
               grace_period: int | None = None, wait_s: float = 30) -> Any:
    """A storage client of the proxy at `url` (grpc:// or grpcs://), checked with one call:
    StorageError naming the cause (TLS on one side only, the token refused) in one line.
    With a `heartbeat_interval` (a worker's) its trials beat, start and fail stale through
    hpsearch's worker methods, checked to be there."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # not gRPC's own line per failed handshake
    import grpc

    secure = url.startswith("grpcs://")
    host, _, port = url.split("://", 1)[1].rstrip("/").partition(":")
    host, port_number = host or "localhost", int(port or 13000)
    token = client_token()

    def channel() -> grpc.Channel:
        address = f"{host}:{port_number}"
        if secure:
            made = grpc.secure_channel(address, grpc.ssl_channel_credentials(client_ca()),
                                       options=_OPTIONS)
        else:
            made = grpc.insecure_channel(address, options=_OPTIONS)
        return grpc.intercept_channel(made, _with_token(token)) if token else made

    proxy = grpc_proxy_client(host, port_number, channel, mixin=WorkerMethods)
    proxy.url, proxy.heartbeat_interval, proxy.grace_period = url, heartbeat_interval, grace_period
    deadline = time.monotonic() + wait_s
    while True:
        try:
            ping_proxy(proxy, timeout=5)
            if heartbeat_interval is not None:
                proxy.hello()
            return proxy
        except grpc.RpcError as e:
            code, said = e.code(), " ".join(str(e.details() or "").split())
            if code == grpc.StatusCode.UNAUTHENTICATED:
                why = "with another token" if token else f"without a token (${TOKEN_ENV})"
                raise SpecError(f"the storage proxy at {url} refused this client, which came "
                                f"{why}") from None
            starting = code == grpc.StatusCode.UNAVAILABLE and "refused" in said.lower()
            if not starting or time.monotonic() > deadline:
                raise StorageError(f"cannot reach the storage proxy at {url}: {code.name} "
                                   f"({said or 'no detail'}){_hint(secure, said)}") from None
            time.sleep(0.5)  # a proxy starting up: not listening yet


def _hint(secure: bool, said: str) -> str:
    lowered = said.lower()
    if not secure and ("socket closed" in lowered or "connection reset" in lowered
                       or "handshake" in lowered or "eof" in lowered):
        return "; a proxy serving TLS is reached with grpcs://"
    if secure and ("ssl" in lowered or "handshake" in lowered or "certificate" in lowered):
        return ("; over grpcs:// the proxy must serve TLS with a certificate this client trusts"
                " ($HPSEARCH_TLS_CA for a private CA)")
    return ""
