"""`python -m devhost serve`: host function_app.py locally, as `func start` would.

App settings come from the environment; `Values` from `local.settings.json` fill in any that
are not already set (the environment wins, as with Core Tools).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from core.errors import ConfigError
from devhost.app import HostError


def apply_local_settings(path: Path) -> None:
    if not path.exists():
        return
    values = json.loads(path.read_text(encoding="utf-8")).get("Values", {})
    for name, value in values.items():
        os.environ.setdefault(name, str(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devhost")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="host the function app until interrupted")
    serve.add_argument("--app", default="function_app.py", type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", default=int(os.environ.get("DEVHOST_PORT", "7071")), type=int)
    serve.add_argument("--blob-scan-interval", default=1.0, type=float)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("azure").setLevel(logging.WARNING)
    apply_local_settings(args.app.parent / "local.settings.json")

    from devhost.host import DevHost

    try:
        host = DevHost(
            args.app, host=args.host, port=args.port, blob_scan_interval=args.blob_scan_interval
        )
    except (ConfigError, HostError) as exc:
        print(f"devhost: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"devhost: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    host.start()
    print("Functions:", *host.describe(), sep="\n  ", flush=True)
    print(f"devhost: listening on {host.base_url} (Ctrl-C to stop)", flush=True)
    stop.wait()
    print("devhost: stopping", flush=True)
    host.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
