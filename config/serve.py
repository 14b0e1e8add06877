"""``python -m config.serve``: the web server of the platform (console, ``/v1/``, websocket).

uvicorn with its C HTTP parser (httptools, each response's head and body written together:
:mod:`config.http_writes`), the uvloop event loop and the ``websockets`` protocol, serving
``config.asgi:application``. Measured against daphne on the same
machine and code (``python -m inference.bench --server daphne``): twisted's HTTP layer
parses every request's Content-Type through the standard library's email package, a
seventh of a streamed request's server time, and the pure-Python event loop and parser
cost the rest; see the README's performance section. ``manage.py runserver`` (daphne,
reloading on changes) is still there for development.

The one place the server's options are written: ``make run``, the container image, the
live-server tests and the platform benchmark all start it through here.
"""

from __future__ import annotations

import argparse
import os
import signal

import uvicorn

from config.http_writes import CoalescingHttpToolsProtocol

APPLICATION = "config.asgi:application"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Tandem platform (console, OpenAI API, websocket).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info", help="uvicorn's: info logs every request")
    args = parser.parse_args(argv)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler
    # that was there before it started. Left at the default, that kills the process, and no
    # atexit handler runs: the budget leases this process holds (and the ledger rows pending
    # in their batches) would wait for the stale-hold task. This handler makes it a normal exit.
    signal.signal(signal.SIGTERM, _exit_after_shutdown)
    _recover_in_background()
    uvicorn.run(
        APPLICATION,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http=CoalescingHttpToolsProtocol,  # httptools, a response's head and body in one write
        ws="websockets",
        lifespan="off",  # Channels' router speaks http and websocket only
        log_level=args.log_level,
    )


def _recover_in_background() -> None:
    """Charge what earlier processes on this host died owing (their settlement journals), beside the start-up."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    django.setup()
    from inference.journal import recover_in_background

    recover_in_background()


def _exit_after_shutdown(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
