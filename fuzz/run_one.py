"""One fuzz target under atheris, in the sanitizer build's process (see fuzz/__main__.py).

python -m fuzz.run_one TARGET SECONDS WORK_CORPUS SEED_CORPUS FINDINGS
"""

from __future__ import annotations

import sys

import atheris


def main() -> None:
    target, seconds, work, seeds, findings = sys.argv[1:6]
    with atheris.instrument_imports(include=["core", "fuzz"]):
        from fuzz.targets import TARGETS
    run = TARGETS[target]
    options = [
        sys.argv[0], f"-max_total_time={seconds}", f"-artifact_prefix={findings}/",
        "-timeout=20", "-rss_limit_mb=3072", "-max_len=8192", "-print_final_stats=1",
        work, seeds,
    ]  # fmt: skip
    atheris.Setup(options, run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
