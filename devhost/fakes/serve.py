"""Run one push fake in a process of its own (bench, demo), so it does not share a GIL
with the client it serves.

    python -m devhost.fakes.serve apns|fcm [--config JSON]

prints one JSON line (`url`, `cert_path`) once it listens, then serves until stdin closes
or SIGTERM. `--config` sets the fake's state (latency_seconds, public_key_pem, ...).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from devhost.fakes.apns import FakeApns
from devhost.fakes.fcm import FakeFcm

FAKES = {"apns": FakeApns, "fcm": FakeFcm}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m devhost.fakes.serve")
    parser.add_argument("fake", choices=sorted(FAKES))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config", default="{}", help="JSON object of state fields")
    args = parser.parse_args()
    fake = FAKES[args.fake](port=args.port, **json.loads(args.config)).start()
    print(json.dumps({"url": fake.url, "cert_path": str(fake.cert_path)}), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    fake.stop()


if __name__ == "__main__":
    main()
