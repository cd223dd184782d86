"""Run one push fake in a process of its own (services, bench), so that it does not share
a GIL with the client it serves.

    python -m devhost.fakes.serve apns|fcm [--port N] [--config JSON] [--ready-file PATH]

Once it listens it prints, and writes to PATH if given, one JSON line (`url`,
`cert_path`); it serves until SIGTERM or SIGINT. `--config` sets the fake's state
(latency_seconds, public_key_pem, ...); `POST /_fake/config` changes it later.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from devhost.fakes.apns import FakeApns
from devhost.fakes.fcm import FakeFcm

FAKES = {"apns": FakeApns, "fcm": FakeFcm}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m devhost.fakes.serve")
    parser.add_argument("fake", choices=sorted(FAKES))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config", default="{}", help="JSON object of state fields")
    parser.add_argument("--ready-file", type=Path, help="where to write the ready line")
    args = parser.parse_args()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    fake = FAKES[args.fake](port=args.port, **json.loads(args.config)).start()
    ready = json.dumps({"url": fake.url, "cert_path": str(fake.cert_path)})
    if args.ready_file is not None:
        partial = args.ready_file.with_suffix(".partial")
        partial.write_text(ready)
        partial.rename(args.ready_file)  # appears whole
    print(ready, flush=True)
    done.wait()
    fake.stop()


if __name__ == "__main__":
    main()
