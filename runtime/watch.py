"""python -m runtime.watch: standing questions over the latest window of a live video source.

    python -m runtime.watch --engine engines/q7 --source rtsp://cam/stream --question "Is anyone at the gate?" \
        --window 4 --every 2 --trigger "^yes" --jsonl gate.jsonl

Capture, ticks, skipping, reconnects and the line format are ``runtime.live``'s (``Reasoner.watch``); this is its
command line: one JSON line per answer on stdout (and appended to ``--jsonl``), a summary line on stderr. Ctrl-C
stops it (exit 130) and SIGTERM, a service manager's stop, stops it the same way with exit 0: the summary line is
written, every finished line was, and the answer in progress is cancelled.
``--source`` repeated watches several sources on one model (``--question`` before the first ``--source``: every
source's; after a ``--source``: that source's alone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading

from models import checks
from models.checks import process_memory
from models.errors import InputError, run_cli
from runtime.live import WATCH_MAX_NEW_TOKENS, WATCH_TEMPLATE, source_kind, watch_many
from runtime.reasoner import Reasoner, add_load_arguments, load_options


class Ordered(argparse.Action):
    """``--source`` and ``--question`` in the order given (``args.order``), which says whose question is whose."""

    def __call__(self, parser, namespace, values, option_string=None):
        order = getattr(namespace, "order", None) or []
        order.append((self.dest, values))
        namespace.order = order
        setattr(namespace, self.dest, values)


def sources_of(order: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """[(source, its questions)]: questions before the first --source go to every source, a question after a
    --source to that source."""
    common: list[str] = []
    pairs: list[tuple[str, list[str]]] = []
    for kind, value in order:
        if kind == "source":
            pairs.append((value, []))
        elif pairs:
            pairs[-1][1].append(value)
        else:
            common.append(value)
    out = [(src, common + own) for src, own in pairs]
    bare = [src for src, qs in out if not qs]
    if bare:
        raise InputError(f"--source {bare[0]} has no --question (give one before the first --source for every "
                         "source, or after this --source for it alone)")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime.watch", description=checks.description(__doc__),
                                 formatter_class=checks.HelpFormatter)
    ap.add_argument("--engine", required=True, help="export directory made by `python -m export`")
    ap.add_argument("--source", action=Ordered, required=True,
                    help="video file, folder of frames, camera index (0) or RTSP/HTTP URL (whatever OpenCV opens); "
                         "repeat it for several sources on one model")
    ap.add_argument("--question", action=Ordered, required=True,
                    help="a standing question (repeatable): one given before the first --source is asked of every "
                         "source, one given after a --source of that source only")
    ap.add_argument("--window", type=float, default=4.0, help="seconds of video each answer looks at")
    ap.add_argument("--every", type=float, default=2.0, help="seconds of stream time between ticks")
    ap.add_argument("--fps", type=float, default=2.0, help="frames per second sampled into the window")
    ap.add_argument("--method", choices=("base", "vreason", "vreason-lite"), default="base")
    ap.add_argument("--template", choices=("reasoning", "plain"), default=WATCH_TEMPLATE,
                    help="plain (default): the question only, short answers; reasoning: think, then answer")
    ap.add_argument("--max-new-tokens", type=int, default=WATCH_MAX_NEW_TOKENS, help="answer length limit")
    ap.add_argument("--trigger", help="regular expression (case-insensitive); alert is true when it matches the answer")
    ap.add_argument("--max-windows", type=int, default=None,
                    help="stop after this many ticks answered (of each source, with several)")
    ap.add_argument("--jsonl", help="also append each line to this file")
    ap.add_argument("--as-fast-as-possible", action="store_true",
                    help="file or folder source: read as fast as answering allows (offline; no tick skipped)")
    ap.add_argument("--reconnect", type=int, default=5,
                    help="live source: give up after this many failed reopenings in a row (backoff 0.5 s doubling)")
    add_load_arguments(ap)
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def run(args: argparse.Namespace) -> int:
    out = None
    if args.jsonl:
        try:
            out = open(args.jsonl, "a", encoding="utf-8")  # noqa: SIM115 (closed below, lines flushed as written)
        except OSError as e:
            raise InputError(f"--jsonl {args.jsonl}: {e.strerror}") from None
    try:
        sources = sources_of(args.order)
        for src, _ in sources:
            source_kind(src)
        reasoner = Reasoner.load(args.engine, **load_options(args))
        events = watch_many(reasoner, sources, args.window, args.every, args.fps, method=args.method,
                            trigger=args.trigger, max_windows=args.max_windows, realtime=not args.as_fast_as_possible,
                            reconnect=args.reconnect, max_new_tokens=args.max_new_tokens, template=args.template)
        answers, first_rss, last = 0, None, {}
        health = {"reconnecting": 0, "reconnected": 0, "gave_up": 0}
        try:
            for event in events:
                line = json.dumps(event, ensure_ascii=False)
                print(line, flush=True)
                if out is not None:
                    out.write(line + "\n")
                    out.flush()
                if event["event"] == "answer":
                    answers, last[event["source"]] = answers + 1, event
                    first_rss = first_rss or process_memory()
                else:
                    health[event["event"]] = health.get(event["event"], 0) + 1
        finally:
            if last:  # what the run cost, on stderr (stdout stays JSON lines); running totals are per source
                gave_up = "gave up" if health["gave_up"] else "no give-up"
                skipped = sum(e["skipped_ticks"] for e in last.values())
                dropped = sum(e["dropped_frames"] for e in last.values())
                several = f" over {len(sources)} sources" if len(sources) > 1 else ""
                print(f"{answers} answers{several}; {skipped} ticks skipped, {dropped} frames "
                      f"dropped; {health['reconnecting']} reconnect attempts, {health['reconnected']} reconnected, "
                      f"{gave_up}; resident memory {first_rss / 2**20:.0f} MiB after the first answer, "
                      f"{process_memory() / 2**20:.0f} MiB at the end; reuse store "
                      f"{reasoner.reuse.used / 2**20:.0f} of {reasoner.reuse_mb} MiB", file=sys.stderr)
    finally:
        if out is not None:
            out.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with stop_on_sigterm() as stopped:
        code = run_cli(run, args, interrupted="stopped; every finished line was written")
    return 0 if stopped and code == 130 else code


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM stops the command as Ctrl-C does (the summary written, the answer in progress cancelled); the list
    it yields holds the signal once one came. On the main thread only (elsewhere Python takes no handler)."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def stop(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(main())
