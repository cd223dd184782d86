"""Builds the C speedups: the log export's records (switchboard_speedups.c) and a segment
sync's buckets (switchboard_sync.c)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "switchboard_speedups",
            sources=["switchboard_speedups.c"],
            depends=["shared.h"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "switchboard_sync",
            sources=["switchboard_sync.c"],
            depends=["shared.h"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ],
)
