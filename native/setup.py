"""Builds the optional C speedups of the log export (see switchboard_speedups.c)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "switchboard_speedups",
            sources=["switchboard_speedups.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ],
)
