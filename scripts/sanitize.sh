#!/usr/bin/env bash
# The native exit core under AddressSanitizer and UndefinedBehaviorSanitizer.
#
# Copies the tree as it is (uncommitted changes included, build outputs left out) to a
# temporary directory, builds kvmpy._core there with KVMPY_SANITIZE=1 (setup.py:
# -fsanitize=address,undefined), and runs against that build, with gcc's libasan
# preloaded into Python (and the kvmpy processes the guest tests start):
#   tests/test_native_differential.py, tests/test_native_core.py, tests/test_native_inject.py,
#   the IPI guests of tests/test_apic_guests.py and the short IPI stress.
# Fails on any test failure and on any sanitizer report (ASan and UBSan halt at their
# first error; pytest captures Python's output only, so a report on fd 2 is seen, kept
# in a log and checked). CPython does not free everything at exit by design: leak
# detection is off. Signed overflow is not UB here: Python's CFLAGS carry -fwrapv.
# A guest test's kvmpy child that hits a report dies, and its test fails.
#
# Usage: bash scripts/sanitize.sh [pytest arguments, e.g. -x or -k core]
# The repository's own in-place kvmpy/_core*.so is neither used nor touched.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CC="${CC:-gcc}"

ASAN_LIB="$("$CC" -print-file-name=libasan.so)"
if [ ! -e "$ASAN_LIB" ]; then
    echo "sanitize: $CC has no libasan.so (Debian: apt-get install libasan8)" >&2
    exit 2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvmpy-sanitize.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
TREE="$WORK/tree"
LOGS="$WORK/logs"
mkdir -p "$TREE" "$LOGS"

# Tracked and untracked-but-not-ignored files: the sources, not the build outputs.
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && tar --null -T - -cf - 2>/dev/null) | tar -C "$TREE" -xf -

echo "sanitize: building kvmpy._core with ASan+UBSan in $TREE"
(cd "$TREE" && KVMPY_SANITIZE=1 "$PYTHON" setup.py -q build_ext --inplace >"$LOGS/build.txt" 2>&1) \
    || { cat "$LOGS/build.txt" >&2; echo "sanitize: build failed" >&2; exit 1; }
SO="$(ls "$TREE"/kvmpy/_core*.so)"
ldd "$SO" | grep -q libasan || { echo "sanitize: $SO is not linked with libasan" >&2; exit 1; }

# Guest images into the repository's cache (guest/build, ignored by git), before any
# process runs with the sanitizer preloaded (gcc and ld need not).
export KVMPY_GUEST_BUILD_DIR="$REPO/guest/build"
(cd "$TREE" && "$PYTHON" -m kvmpy.guestbuild >/dev/null)

# Python's own allocator would hide an overrun of the buffers the core shares with
# LocalApic (bytearrays of 256 bytes live in pymalloc's arenas): plain malloc, which
# ASan instruments.
export PYTHONMALLOC=malloc
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$LOGS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
run() { (cd "$TREE" && LD_PRELOAD="$ASAN_LIB" "$PYTHON" "$@"); }

# The sanitized build is the one imported.
run -c "import kvmpy._core as c, sys; assert c.__file__ == sys.argv[1], c.__file__" "$SO"

status=0
run -m pytest -q -p no:cacheprovider -m "not slow" --capture=sys \
    tests/test_native_differential.py \
    tests/test_native_core.py \
    tests/test_native_inject.py \
    tests/test_tracing_e2e.py::test_the_core_timer_threads_firings_are_traced \
    tests/test_apic_guests.py::test_apic_ipi_exact_counts \
    tests/test_ipi_stress.py::test_random_ipis_are_counted_exactly \
    "$@" 2> >(tee "$LOGS/stderr.txt" >&2) || status=$?
wait  # for tee

reports=$(find "$LOGS" -name 'asan*' | sort)
if [ -n "$reports" ] || grep -qE "runtime error:|ERROR: AddressSanitizer|SUMMARY: \w+Sanitizer" \
        "$LOGS/stderr.txt"; then
    for f in $reports; do
        echo "---- $f" >&2
        cat "$f" >&2
    done
    echo "sanitize: FAILED: sanitizer reports above" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "sanitize: FAILED: pytest exit status $status (no sanitizer report)" >&2
    exit "$status"
fi
echo "sanitize: clean (ASan+UBSan, $(basename "$SO"))"
