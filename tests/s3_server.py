"""A real S3 API server for the tests: moto's server mode over HTTP on 127.0.0.1.

usage: python -m tests.s3_server    (prints ``{"port": P}`` once it listens; runs until killed or
until its stdin closes, so that it never outlives the test session that started it)

Moto handles each request on its own thread and checks ``If-None-Match: *`` and then stores
the object as two separate steps, so two racing conditional PUTs could both pass in moto
where S3 lets exactly one through. Real S3 is linearizable per request; we get the same by
running one request at a time through moto (a lock around the WSGI app). Nothing else of
moto is changed.
"""
from __future__ import annotations

import json
import os
import sys
import threading


def serializing(app):
    """Wrap a WSGI app so that requests run one at a time (their bodies are read inside the call)."""
    lock = threading.Lock()

    def wrapped(environ, start_response):
        with lock:
            return list(app(environ, start_response))

    return wrapped


def main() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = serializing(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    os.environ["MOTO_PORT"] = str(server.server_port)
    print(json.dumps({"port": server.server_port}), flush=True)
    sys.stdout.close()
    threading.Thread(target=_exit_when_parent_goes, daemon=True).start()
    server.serve_forever()


def _exit_when_parent_goes() -> None:
    sys.stdin.read()  # EOF: the parent closed the pipe or died
    os._exit(0)


if __name__ == "__main__":
    main()
