"""A moto S3 (and IAM) server for the tests, in a process of its own, that can stall chosen requests.

Run as ``python s3_server.py RULES``: it serves on 127.0.0.1, on a free port that it prints as its
first line, until its standard input closes (its parent ended) or it is killed.

Its own process, not a thread of pytest's: children forked from pytest (DataLoader workers) would
inherit a thread's listening socket and could take its connections and never answer them.

RULES names a JSON file, absent or a list of ``[method, path regex]``, rewritten by the test at any
time. A request that matches a rule gets no answer for as long as that rule stays in the file: a
store that accepts connections and never answers, for the objects the test chooses. Once its rule
is removed the request is answered 503 without reaching moto, as a store that lost it would. Each
stalled request is appended to ``RULES.log`` as ``METHOD PATH``, so a test can tell what it stalled.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

POLL_S = 0.05


class Stalling:
    """WSGI middleware holding back the requests that match a rule of the rules file."""

    def __init__(self, app: Callable, rules: Path) -> None:
        self.app, self.rules, self.log = app, rules, rules.with_name(f"{rules.name}.log")
        self.lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        request = f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}"
        if not self._stalled(request):
            return self.app(environ, start_response)
        with self.lock, self.log.open("a") as log:
            log.write(f"{request}\n")
        while self._stalled(request):
            time.sleep(POLL_S)
        start_response("503 Service Unavailable", [("Content-Length", "0")])
        return [b""]

    def _stalled(self, request: str) -> bool:
        try:
            rules = json.loads(self.rules.read_text())
        except FileNotFoundError:
            return False
        return any(re.fullmatch(f"{method} {path}", request) for method, path in rules)


def main(rules: str) -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    app = Stalling(DomainDispatcherApplication(create_backend_app), Path(rules))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_port, flush=True)
    sys.stdin.read()  # returns when the parent closes its end, or dies


if __name__ == "__main__":
    main(sys.argv[1])
