"""``fts-tui``: ``attach [RUN | ENDPOINT]`` to a live run, or ``replay RUN_DIR`` a finished or crashed one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fts_tui import __version__
from fts_tui.pacing import DEFAULT_CPU_BUDGET


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fts-tui", description="A live cockpit for fts-daemon runs.")
    parser.add_argument("--version", action="version", version=f"fts-tui {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    attach = sub.add_parser(
        "attach",
        help="follow a live run",
        description="Attach to a live run: no argument picks the only (or latest) live run in the registry; "
        "RUN is a run id or run directory; ENDPOINT is the daemon's control endpoint (tcp://host:port or ipc://path).",
    )
    attach.add_argument("target", nargs="?", metavar="RUN | ENDPOINT")
    attach.add_argument("--events", metavar="ENDPOINT", help="the PUB endpoint, when ENDPOINT's hello does not say it")
    attach.add_argument("--server-key", metavar="KEY_OR_FILE", help="the daemon's CURVE public key (Z85) or a .key file")
    attach.add_argument(
        "--client-key", metavar="FILE", help="this client's CURVE secret key file (.key_secret); default: a fresh key pair"
    )
    attach.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each control reply (default 5)")
    replay = sub.add_parser("replay", help="open a finished (or crashed) run, read-only")
    replay.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (or its events.jsonl)")
    for p in (attach, replay):
        p.add_argument("--redraw-hz", type=float, default=None,
                       help="the most screen updates per second (default 20; bursts of events are drawn as they come)")
    attach.add_argument("--cpu-budget", type=float, default=100 * DEFAULT_CPU_BUDGET, metavar="PERCENT",
                        help="while every core is busy (idle under 10%% of the time; where that cannot be read, a "
                        "1-minute load average >= 90%% of the cores), draw only as often "
                        "as keeps fts-tui under this share of one core, down to one frame a second (default "
                        f"{100 * DEFAULT_CPU_BUDGET:g}; 0: always draw at --redraw-hz)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fts_tui.app import FtsApp

    redraw_hz = args.redraw_hz if args.redraw_hz is not None else FtsApp.DEFAULT_REDRAW_HZ
    if args.command == "replay":
        from fts_tui.source import ReplaySource

        source = ReplaySource(args.run_dir)
        try:
            source.load()
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            print(f"fts-tui: {err}", file=sys.stderr)
            return 2
        FtsApp(source, redraw_hz=redraw_hz).run()
        return 0

    from fts_tui.client import LiveSource, ResolveError, resolve_target

    try:
        target = resolve_target(args.target, events=args.events, server_key=args.server_key, client_key=args.client_key)
    except ResolveError as err:
        print(f"fts-tui: {err}", file=sys.stderr)
        return 2
    budget = args.cpu_budget / 100 if args.cpu_budget > 0 else None
    FtsApp(LiveSource(target, request_timeout=args.timeout), redraw_hz=redraw_hz, cpu_budget=budget).run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
