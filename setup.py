"""Builds kvmpy's native exit core (kvmpy/native/*.c) as the extension `kvmpy._core`.

Everything else is in pyproject.toml. `KVMPY_SANITIZE=1` builds the core with
AddressSanitizer and UndefinedBehaviorSanitizer (scripts/sanitize.sh).
"""

import os

from setuptools import Extension, setup

SOURCES = ["module.c", "vcpu_loop.c", "lapic_fast.c", "kick.c"]
cflags = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers", "-Wno-cast-function-type"]
ldflags: list[str] = []
if os.environ.get("KVMPY_SANITIZE"):
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    ldflags += ["-fsanitize=address,undefined"]

setup(
    ext_modules=[
        Extension(
            "kvmpy._core",
            sources=[f"kvmpy/native/{name}" for name in SOURCES],
            depends=["kvmpy/native/core.h"],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
        )
    ]
)
