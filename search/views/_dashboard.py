"""`hpsearch dashboard`: optuna-dashboard on the study storage, with the trials' artifacts.

The storage is opened for watching (`search.storage.open_for_watching`): the dashboard never
disturbs the workers, and never initialises a database it was pointed at by mistake. Served
beyond this machine it needs TLS and a token (`search._auth.serving`): `TokenGate` asks for the
token on a login page and keeps a cookie made from it (never the token itself) before any page
or API call reaches optuna-dashboard.
"""

from __future__ import annotations

import html
import socket
import ssl
from http import cookies
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from search._auth import TOKEN_ENV, derived, same_token
from search._errors import SearchError
from search._log import logger
from search._urls import redact
from search.storage import artifact_location, open_artifact_store, open_for_watching

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from search._auth import Serving

LOG = logger("views")
LOGIN = "/hpsearch-login"
COOKIE = "hpsearch_dashboard"
HANDSHAKE_S = 30  # a TLS client has this long to finish its handshake
_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>hpsearch dashboard</title>
<style>body{{font-family:sans-serif;margin:4em auto;max-width:24em}}input{{width:100%;
padding:.5em;margin:.5em 0}}.error{{color:#b00}}</style></head><body>
<h1>hpsearch dashboard</h1><p>This dashboard needs its token (${env} where it was started).</p>
{error}<form method="post" action="{login}"><input type="password" name="token" id="token"
autofocus autocomplete="current-password" placeholder="token"><input type="hidden"
name="next" value="{next}"><input type="submit" id="login" value="Open the dashboard">
</form></body></html>"""


class TokenGate:
    """A WSGI app in front of optuna-dashboard: nothing passes without the token, given once
    on the login page (a cookie then) or as ``Authorization: Bearer <token>``."""

    def __init__(self, app: Callable, token: str, *, secure: bool) -> None:
        self.app, self.token, self.secure = app, token, secure
        self.cookie = derived(token, "hpsearch dashboard cookie")

    def __call__(self, environ: dict[str, Any], start: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == LOGIN:
            return self.login(environ, start)
        if self.allowed(environ):
            return self.app(environ, start)
        if environ.get("REQUEST_METHOD") == "GET" and not path.startswith("/api/"):
            start("303 See Other", [("Location", LOGIN), ("Cache-Control", "no-store")])
            return [b""]
        start("401 Unauthorized", [("Content-Type", "application/json")])
        return [b'{"reason": "this dashboard needs its token: log in at ' + LOGIN.encode()
                + b'"}']

    def allowed(self, environ: dict[str, Any]) -> bool:
        sent = environ.get("HTTP_AUTHORIZATION", "")
        if sent.startswith("Bearer ") and same_token(sent[len("Bearer "):], self.token):
            return True
        jar = cookies.SimpleCookie(environ.get("HTTP_COOKIE", ""))
        return COOKIE in jar and same_token(jar[COOKIE].value, self.cookie)

    def login(self, environ: dict[str, Any], start: Callable) -> Iterable[bytes]:
        error, status = "", "200 OK"
        if environ.get("REQUEST_METHOD") == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            form = parse_qs(environ["wsgi.input"].read(min(size, 65536)).decode(
                errors="replace"))
            if same_token(form.get("token", [""])[0].strip(), self.token):
                target = form.get("next", ["/"])[0]
                target = target if target.startswith("/") and not target.startswith("//") \
                    else "/"
                flags = "; Secure" if self.secure else ""
                start("303 See Other", [
                    ("Location", target), ("Cache-Control", "no-store"),
                    ("Set-Cookie", f"{COOKIE}={self.cookie}; Path=/; HttpOnly; "
                                   f"SameSite=Strict{flags}")])
                return [b""]
            error, status = '<p class="error">That is not the token.</p>', "401 Unauthorized"
        page = _PAGE.format(env=TOKEN_ENV, error=error, login=LOGIN, next=html.escape("/"))
        start(status, [("Content-Type", "text/html; charset=utf-8"),
                       ("Cache-Control", "no-store")])
        return [page.encode()]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    context: ssl.SSLContext | None = None  # TLS: each connection's handshake in its thread

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.context is None:
            return super().finish_request(request, client_address)
        # Not on the listening socket: there the handshake of one silent or slow client (a
        # browser's speculative connection) would hold every other connection up.
        request.settimeout(HANDSHAKE_S)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except OSError:  # ssl.SSLError included: a client that does not speak TLS, or left
            return
        try:
            tls.settimeout(None)
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """No line per request (optuna-dashboard polls every few seconds)."""


def serve(url: str, *, serving: Serving, port: int) -> None:
    """Serve optuna-dashboard for the storage at `url` until Ctrl-C: behind the token when
    `serving` has one, over TLS when it has a certificate."""
    storage = open_for_watching(url)  # refuse what cannot be opened, now
    try:
        from optuna_dashboard import wsgi
    except ImportError as e:
        raise SearchError("optuna-dashboard is not installed: pip install "
                          "'hpsearch[dashboard]'") from e
    location = artifact_location(url)
    store = open_artifact_store(location) if location else None
    app = wsgi(storage, artifact_store=store)
    if serving.token:
        app = TokenGate(app, serving.token, secure=serving.tls)
    server_class = type("Server", (_Server,), {
        "address_family": socket.AF_INET6 if ":" in serving.host else socket.AF_INET})
    httpd = make_server(serving.host, port, app, server_class=server_class,
                        handler_class=_Quiet)
    if serving.tls:
        httpd.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        httpd.context.load_cert_chain(serving.cert_path, serving.key_path)
        # wsgi.url_scheme https: the redirects optuna-dashboard makes stay on TLS.
        httpd.base_environ["HTTPS"] = "on"
    shown = "localhost" if serving.host in ("0.0.0.0", "::") else serving.host
    if ":" in shown:
        shown = f"[{shown}]"
    artifacts = f"artifacts from {location}" if location else "artifacts off"
    guarded = "; log in with the token" if serving.token else ""
    print(f"optuna-dashboard for {redact(url)} at {'https' if serving.tls else 'http'}://"
          f"{shown}:{port}/ ({artifacts}{guarded}; Ctrl-C stops it)", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
