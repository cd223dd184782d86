"""`python -m fuzz`: coverage-guided fuzzing of the native code against its reference.

    python -m fuzz [--seconds 60] [--targets split,bucket] [--replay]

Each target (fuzz/targets.py) runs in a process of its own under atheris (libFuzzer),
with the C extension built by `make sanitize` (.sanitize/: clang with AddressSanitizer,
UndefinedBehaviorSanitizer and libFuzzer's coverage, the runtime preloaded) and the
Python of `core/` instrumented, so both the C and the reference's branches guide it. The
committed seeds (fuzz/corpus/<target>/) start each run; what it finds new is kept under
.sanitize/corpus/. A divergence, an exception or a sanitizer report is a finding: the
input is written to .sanitize/findings/<target>/ and the command exits 1. It prints, per
target, executions, executions per second, corpus size and findings, and writes them to
.sanitize/fuzz.json.

`--replay` runs every target once per committed seed and finding, in this process,
without atheris or the sanitizers (what the tests do too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SANITIZE = ROOT / ".sanitize"
SEEDS = ROOT / "fuzz" / "corpus"
_STAT = re.compile(r"stat::(\w+):\s+(\d+)")


def _environment() -> dict[str, str]:
    runtime = SANITIZE / "asan_with_fuzzer.so"
    if not runtime.exists() or not (SANITIZE / "lib").is_dir():
        raise SystemExit("the sanitizer build is missing: run `make sanitize` first")
    return {
        **os.environ,
        "LD_PRELOAD": str(runtime),
        "PYTHONPATH": os.pathsep.join([str(SANITIZE / "lib"), str(ROOT)]),
        # Python's own allocations are never freed at exit: leaks are not findings here.
        "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1:abort_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }


def fuzz(target: str, seconds: int) -> dict[str, object]:
    work = SANITIZE / "corpus" / target
    findings = SANITIZE / "findings" / target
    for folder in (work, findings):
        folder.mkdir(parents=True, exist_ok=True)
    seeds = SEEDS / target
    before = {path.name for path in findings.iterdir()}
    command = [sys.executable, "-m", "fuzz.run_one", target, str(seconds), str(work),
               str(seeds), str(findings)]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=_environment(), capture_output=True, text=True,
                          timeout=seconds + 300, check=False)  # fmt: skip
    elapsed = time.monotonic() - started
    stats = {name: int(value) for name, value in _STAT.findall(done.stderr)}
    new = sorted({path.name for path in findings.iterdir()} - before)
    if done.returncode != 0 and not new:
        new = [f"exit status {done.returncode}"]
    if new:
        sys.stderr.write(done.stderr[-4000:])
    executions = stats.get("number_of_executed_units", 0)
    return {
        "target": target, "seconds": round(elapsed, 1), "executions": executions,
        "per_second": round(executions / elapsed) if elapsed else 0,
        "corpus": len(list(work.iterdir())) + len(list(seeds.iterdir())), "findings": new,
    }  # fmt: skip


def replay(targets: list[str]) -> int:
    from fuzz.targets import TARGETS, each_seed

    failures = 0
    for target in targets:
        folders = [SEEDS / target, SANITIZE / "findings" / target]
        for folder in (f for f in folders if f.is_dir()):
            for name, data in each_seed(folder):
                try:
                    TARGETS[target](data)
                except Exception as error:
                    failures += 1
                    print(f"{target}/{name}: {type(error).__name__}: {error}"[:500])
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    from fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(prog="python -m fuzz")
    parser.add_argument("--seconds", type=int, default=60, help="per target")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--replay", action="store_true")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {sorted(TARGETS)}")
    if args.replay:
        return replay(targets)
    results = [fuzz(target, args.seconds) for target in targets]
    for result in results:
        found = ", ".join(result["findings"]) or "none"  # type: ignore[arg-type]
        print(f"{result['target']:8} {result['executions']:>9} executions "
              f"({result['per_second']}/s) in {result['seconds']} s, corpus {result['corpus']}, "
              f"findings: {found}")  # fmt: skip
    (SANITIZE / "fuzz.json").write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(result["findings"] for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
