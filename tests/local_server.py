"""A local HTTP server on 127.0.0.1 (a free port) in a background thread, for the tests' stand-ins
of remote services; a subclass gives the request handler class (`_handler`)."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer


class LocalServer:
    def __init__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        raise NotImplementedError
