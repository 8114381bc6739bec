"""`hpsearch dashboard`: optuna-dashboard on the study storage."""

from __future__ import annotations

import argparse
import sys

from search._command import EXIT_OK, Command, _positive_int, _storage_arg
from search._errors import SearchError
from search._storage import redact


class Dashboard(Command):
    """Serve optuna-dashboard on the study storage (live curves, plots, trial tables)."""

    name = "dashboard"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _storage_arg(parser)
        parser.add_argument("--host", default="127.0.0.1",
                            help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
        parser.add_argument("--port", type=_positive_int, default=8080)

    def run(self, args: argparse.Namespace) -> int:
        from search._storage import open_storage, resolve_url

        url = resolve_url(args.storage)
        storage = open_storage(url, must_exist=True)  # refuse what cannot be opened, now
        try:
            from optuna_dashboard import run_server
        except ImportError as e:
            raise SearchError("optuna-dashboard is not installed: pip install "
                              "'hpsearch[dashboard]'") from e
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: the dashboard has no authentication; binding {args.host} lets "
                  "anyone who can reach this machine read and edit the studies",
                  file=sys.stderr)
        shown = "localhost" if args.host in ("0.0.0.0", "::") else args.host
        print(f"optuna-dashboard for {redact(url)} at http://{shown}:{args.port}/ "
              "(Ctrl-C stops it)", flush=True)
        run_server(storage, host=args.host, port=args.port)
        return EXIT_OK
