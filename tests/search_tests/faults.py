"""What the fault drills (tests and benchmarks/fault_drills.py) need around the processes
they fault: a database that goes away, and the processes a signal must end.

`DatabaseProxy` is a loopback TCP proxy in front of the real server that the drill controls.
Clients that connect through it (`DatabaseProxy.url`) meet a real network fault while every
other client of the same server goes on untouched: the connection carrying one query lost in
the middle of a command (`cut_on`), or the database away for a while (`outage`): every open
connection dropped and new ones refused, as a stopped server refuses them. `processes_of` is
the census of a session a terminal's Ctrl-C must leave empty.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import psutil
from sqlalchemy.engine import make_url


def processes_of(session: int) -> list[psutil.Process]:
    """Every living process below `session`'s leader (workers, their commands in sessions of
    their own) and every other one of the session (a zombie is dead: its parent reaps it)."""
    try:
        found = {p.pid: p for p in psutil.Process(session).children(recursive=True)}
    except psutil.NoSuchProcess:
        found = {}
    for p in psutil.process_iter():
        try:
            if p.pid != session and os.getsid(p.pid) == session:
                found[p.pid] = p
        except OSError:  # gone meanwhile
            pass
    return [p for p in found.values() if _living(p)]


def _living(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class DatabaseProxy:
    """A TCP proxy on 127.0.0.1 to the server of `url`, on a port of its own.

    `cut_on`: the connection carrying the first query that holds these bytes is dropped
    (once) before the query reaches the server; `cut` is set when it was.
    """

    def __init__(self, url: str, *, cut_on: bytes | None = None) -> None:
        parsed = make_url(url)
        self.target = (parsed.host or "127.0.0.1", parsed.port or 5432)
        self.marker, self.cut = cut_on, threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._away = False
        self.server = socket.create_server(("127.0.0.1", 0))  # SO_REUSEADDR: `up` rebinds
        self.port = self.server.getsockname()[1]
        self.url = parsed.set(host="127.0.0.1", port=self.port).render_as_string(
            hide_password=False)
        self._serve()

    def _serve(self) -> None:
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:  # closed: `down` or `close`
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                away = self._away  # accepted as the outage began: dropped with the others
                if not away:
                    self._open |= {client, upstream}
            if away:
                self._drop((client, upstream))
                continue
            for a, b, watch in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, watch, client, upstream),
                                 daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, watch: bool,
              *both: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if (watch and self.marker is not None and self.marker in data
                        and not self.cut.is_set()):
                    self.cut.set()
                    break  # the query never arrives: the connection is lost mid-command
                sink.sendall(data)
        except OSError:
            pass
        self._drop(both)

    def _drop(self, sockets) -> None:
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)  # the peer sees the connection end now
            except OSError:
                pass
            s.close()
        with self._lock:
            self._open -= set(sockets)

    def down(self) -> None:
        """The database goes away: the port is closed (a connect is refused) and every open
        connection dropped."""
        self.server.close()
        with self._lock:
            self._away = True
            open_now = list(self._open)
        self._drop(open_now)

    def up(self) -> None:
        """The database is back, on the same port."""
        self.server = socket.create_server(("127.0.0.1", self.port))
        with self._lock:
            self._away = False
        self._serve()

    def outage(self, seconds: float) -> float:
        """Away for `seconds`, then back: how long it really was away."""
        started = time.monotonic()
        self.down()
        try:
            time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        finally:
            self.up()
        return time.monotonic() - started

    def close(self) -> None:
        self.down()
