"""Builds kvmpy's native exit core (kvmpy/native/*.c) as the extension `kvmpy._core`.

Everything else is in pyproject.toml. `KVMPY_SANITIZE=1` builds the core with
AddressSanitizer and UndefinedBehaviorSanitizer (scripts/sanitize.sh).
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """Unlinks an in-place core before writing the new one: a running kvmpy keeps the
    old file mapped (overwriting it in place would crash that process)."""

    def copy_extensions_to_source(self) -> None:
        for ext in self.extensions:
            target = os.path.join(os.path.dirname(__file__) or ".",
                                  self.get_ext_filename(self.get_ext_fullname(ext.name)))
            if os.path.exists(target):
                os.unlink(target)
        super().copy_extensions_to_source()

SOURCES = ["module.c", "vcpu_loop.c", "lapic_fast.c", "kick.c", "timer.c"]
cflags = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers", "-Wno-cast-function-type"]
ldflags: list[str] = []
if os.environ.get("KVMPY_SANITIZE"):
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    ldflags += ["-fsanitize=address,undefined"]

setup(
    cmdclass={"build_ext": BuildExt},
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
