"""Builds the C speedups: the log export's records (switchboard_speedups.c) and a segment
sync's split and buckets (switchboard_sync.c).

Both read customer files, so they are built hardened the way distributions build packages:
a stack protector on every function with a local array, glibc's checked string functions
(`_FORTIFY_SOURCE`, which needs optimisation: Python's own -O3 stays, as -O2 cost the
split 6% in `bench/`), and read-only relocations bound at load.
`tests/test_native_build.py` checks the built modules for them; `make sanitize` builds
the same sources under AddressSanitizer and UBSan instead.
"""

import os

from setuptools import Extension, setup

WARNINGS = ["-Wall", "-Wextra", "-Wno-unused-parameter"]
HARDENING = ["-fstack-protector-strong", "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=2"]
LINK = ["-Wl,-z,relro,-z,now"]
# `make sanitize` sets this: instrumented, unoptimised enough for useful reports.
SANITIZE = os.environ.get("SWITCHBOARD_SANITIZE_FLAGS", "").split()
COMPILE = WARNINGS + (SANITIZE or HARDENING)
LINK_ARGS = LINK + SANITIZE

setup(
    ext_modules=[
        Extension(
            name,
            sources=[f"{name}.c"],
            depends=["shared.h"],
            extra_compile_args=COMPILE,
            extra_link_args=LINK_ARGS,
        )
        for name in ("switchboard_speedups", "switchboard_sync")
    ],
)
