"""Builds the test guests in guest/ into ELF32 multiboot images with the machine's gcc.

A guest is guest/<name>.c or guest/<name>.S, linked with the runtime in guest/lib/ by
guest/lib/link.ld. There is no 32-bit libc or libgcc here, so everything is freestanding
(no 64-bit division, no SSE). Images are cached in guest/build/ under a name keyed by a
hash of every source, the flags and the gcc version; a build writes a temporary file and
renames it into place, so concurrent builds of one guest are safe.

`python -m kvmpy.guestbuild [names...]` prebuilds the named guests (default: all).
KVMPY_GUEST_DIR and KVMPY_GUEST_BUILD_DIR override the source and cache directories.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kvmpy.errors import KvmpyError

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
SOURCE_SUFFIXES = (".c", ".S")
LIB_SUFFIXES = (".c", ".S", ".h", ".ld")

CFLAGS = (
    "-m32",
    "-march=i686",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",  # no memset() calls inside memset()
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wa,--noexecstack",
)
LDFLAGS = (
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,-m,elf_i386",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
)


class GuestBuildError(KvmpyError):
    """gcc is missing, a guest does not exist, or a guest failed to compile or link."""


def guest_dir() -> Path:
    return Path(os.environ.get("KVMPY_GUEST_DIR", GUEST_DIR))


def build_dir(source_dir: Path | None = None) -> Path:
    env = os.environ.get("KVMPY_GUEST_BUILD_DIR")
    if env:
        return Path(env)
    return (source_dir or guest_dir()) / "build"


def guest_names(source_dir: Path | None = None) -> list[str]:
    """Every guest: the stems of guest/*.c and guest/*.S, sorted."""
    src = source_dir or guest_dir()
    return sorted({p.stem for p in src.iterdir() if p.is_file() and p.suffix in SOURCE_SUFFIXES})


@functools.lru_cache(maxsize=4)
def _compiler_version(gcc: str) -> str:
    try:
        out = subprocess.run(
            [gcc, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestBuildError(f"cannot run {gcc} to build guests: {exc}") from None
    return out.splitlines()[0] if out else gcc


def _find_gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GuestBuildError("gcc not found: install gcc and binutils to build the test guests")
    return gcc


def _guest_source(src: Path, name: str) -> Path:
    for suffix in SOURCE_SUFFIXES:
        path = src / f"{name}{suffix}"
        if path.is_file():
            return path
    known = ", ".join(guest_names(src)) or "none"
    raise GuestBuildError(f"no guest named {name!r} in {src} (have: {known})")


def _lib_files(src: Path) -> list[Path]:
    lib = src / "lib"
    if not (lib / "link.ld").is_file():
        raise GuestBuildError(f"guest runtime missing: {lib / 'link.ld'} not found")
    return sorted(p for p in lib.iterdir() if p.is_file() and p.suffix in LIB_SUFFIXES)


def _cache_key(gcc_version: str, files: list[Path], src: Path) -> str:
    h = hashlib.sha256()
    h.update(gcc_version.encode() + b"\0")
    h.update("\0".join(CFLAGS + LDFLAGS).encode() + b"\0")
    for path in files:
        data = path.read_bytes()
        h.update(f"{path.relative_to(src)}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def _first_error(stderr: str) -> str:
    """The compiler's or linker's first real error line (not collect2's summary)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in ("error:", "undefined reference", "error"):
        for line in lines:
            if marker in line.lower() and not line.startswith("collect2"):
                return line
    return lines[0] if lines else "no compiler output"


def build_guest(
    name: str, *, source_dir: Path | None = None, cache_dir: Path | None = None
) -> Path:
    """The path of guest `name`'s ELF image, building it if its sources changed."""
    src = Path(source_dir) if source_dir else guest_dir()
    out_dir = Path(cache_dir) if cache_dir else build_dir(src)
    source = _guest_source(src, name)
    lib_files = _lib_files(src)
    gcc = _find_gcc()
    key = _cache_key(_compiler_version(gcc), [*lib_files, source], src)
    image = out_dir / f"{name}-{key}.elf"
    if image.is_file():
        return image

    out_dir.mkdir(parents=True, exist_ok=True)
    lib = src / "lib"
    compile_units = [p for p in lib_files if p.suffix in (".c", ".S")]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}-", suffix=".tmp", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    cmd = [
        gcc,
        *CFLAGS,
        *LDFLAGS,
        f"-I{lib}",
        f"-Wl,-T,{lib / 'link.ld'}",
        *map(str, compile_units),
        str(source),
        "-o",
        str(tmp),
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise GuestBuildError(f"building guest {name!r} failed: {_first_error(result.stderr)}")
        tmp.chmod(0o644)
        os.replace(tmp, image)
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestBuildError(f"building guest {name!r} failed: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _remove_stale(out_dir, name, image)
    return image


def _remove_stale(out_dir: Path, name: str, keep: Path) -> None:
    """Drop older builds of `name` (best effort: another build may be racing us)."""
    for old in out_dir.glob(f"{name}-*.elf"):
        if old != keep and old.stem.rsplit("-", 1)[0] == name:
            old.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:])
    try:
        for name in names or guest_names():
            print(f"{name}: {build_guest(name)}")
    except KvmpyError as exc:
        print(f"kvmpy: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
