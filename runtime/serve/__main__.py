"""python -m runtime.serve: an OpenAI-style chat endpoint with video over an export.

    python -m runtime.serve --engine work/demo/tiny-engine --media-root work/demo --port 8000
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "circle-right.mp4"}},
             {"type": "text", "text": "Which way does the circle move?"}]}], "max_tokens": 32}'

Binds 127.0.0.1 unless --host says otherwise. With --api-key (or VREASON_API_KEY), every route but the health
checks needs ``Authorization: Bearer KEY``. SIGTERM stops accepting, lets running requests finish (``--grace-s``,
10 s by default; answers still running 2 s before its end are cut short with a 503 error) and exits 0. Routes and
fields: docs/serve.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from models import checks
from models.errors import UserError, run_cli
from runtime.reasoner import add_load_arguments, load_options


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime.serve", description=checks.description(__doc__),
                                 formatter_class=checks.HelpFormatter)
    ap.add_argument("--engine", required=True, help="export directory made by `python -m export`")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on")
    ap.add_argument("--api-key", default=os.environ.get("VREASON_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every route but /health/* (default: the "
                         "VREASON_API_KEY environment variable; none: no key)")
    ap.add_argument("--media-root", help="folder whose files requests may name by path (nothing outside it)")
    ap.add_argument("--allow-remote-media", action="store_true",
                    help="fetch http(s) media URLs (public addresses only, no redirects, at most --max-body-mb)")
    ap.add_argument("--allow-media-host", action="append", default=[], metavar="HOST",
                    help="with --allow-remote-media: a host or address that may be fetched although loopback, "
                         "link-local or private (repeatable)")
    ap.add_argument("--allow-camera", action="store_true",
                    help="live streams may name a camera index of this machine")
    ap.add_argument("--max-streams", type=int, default=8, help="live streams that may run at once")
    ap.add_argument("--max-body-mb", type=float, default=64.0,
                    help="largest request body (data: URLs included) and largest fetched media file")
    ap.add_argument("--max-queue", type=int, default=64,
                    help="chat requests that may wait behind the one being answered; more get 429 with Retry-After")
    ap.add_argument("--grace-s", type=float, default=GRACE_S,
                    help=f"on SIGTERM or Ctrl-C, seconds running requests get to finish; answers still running "
                         f"{STOP_MARGIN_S} s before the end are cut short with a 503 error (default {GRACE_S:g})")
    add_load_arguments(ap)
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UserError("runtime.serve needs uvicorn and starlette: pip install 'vreason-edge[serve]'") from None
    from runtime.serve.app import app

    Server = _server_class()

    checks.check_number("--port", args.port, lo=0, hi=65535, integer=True)
    checks.check_number("--max-body-mb", args.max_body_mb, lo=0, lo_open=True)
    checks.check_number("--max-queue", args.max_queue, lo=0, integer=True)
    checks.check_number("--max-streams", args.max_streams, lo=0, integer=True)
    checks.check_number("--grace-s", args.grace_s, lo=0)
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log = logging.getLogger("runtime.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # one JSON line per chat request
    service = app(args.engine, api_key=args.api_key or None, media_root=args.media_root,
                  max_body_mb=args.max_body_mb, max_queue=args.max_queue,
                  allow_remote_media=args.allow_remote_media, media_hosts=args.allow_media_host,
                  allow_camera=args.allow_camera, max_streams=args.max_streams, **load_options(args))
    print(f"serving {args.engine} on http://{args.host}:{args.port} (key {'required' if args.api_key else 'none'})",
          file=sys.stderr)
    config = uvicorn.Config(service, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.grace_s)
    Server(config, service.state.service).run()
    return 0


GRACE_S = 10.0  # SIGTERM: running requests get this long to finish (--grace-s)
STOP_MARGIN_S = 2  # ... less this: then the answers still running are cut short with a 503 error (stop_answers)


def _server_class():
    import asyncio
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM (a service manager's stop) drains and then exits 0 instead of
        re-raising the signal once shut down; Ctrl-C keeps uvicorn's behaviour. Either way the live streams are
        told to stop at once, which ends their event streams (which would otherwise hold the drain open), and chat
        answers still running ``STOP_MARGIN_S`` before the grace period ends are cut short with a 503 error
        (``Service.stop_answers``): their clients get an error saying so, where uvicorn would cut the connection
        and log the cancelled request's traceback."""

        def __init__(self, config, service) -> None:
            super().__init__(config)
            self.service = service

        def handle_exit(self, sig, frame) -> None:
            self.service.streams.close(wait=False)
            if sig == signal.SIGTERM:
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            grace = self.config.timeout_graceful_shutdown or 0
            asyncio.get_running_loop().call_later(max(grace - STOP_MARGIN_S, 0), self.service.stop_answers)
            await super().shutdown(sockets)
    return Server


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
