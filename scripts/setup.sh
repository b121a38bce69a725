#!/usr/bin/env bash
# Set up a fresh machine for kvmpy: Debian packages (the guest toolchain, the KVM
# headers the ABI test compiles against), then kvmpy and its Python dependencies.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# linux-perf: `kvmpy bench ipi --breakdown` records the scheduler's and KVM's tracepoints.
# acpica-tools: the tests read kvmpy's ACPI tables back with iasl and acpiexec.
debs=(gcc binutils libc6-dev linux-libc-dev make linux-perf acpica-tools)
missing=()
for pkg in "${debs[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test,plot]' 2>&1 \
    | grep -v -e "Running pip as the 'root' user" -e "is ignored: it is neither" || true
"$PYTHON" -c "import kvmpy, elftools, capstone, rich, hypothesis, pytest" \
    || { echo "setup: Python dependencies did not install" >&2; exit 1; }

# Build the bundled guests now so the first test run does not pay for it (cached).
"$PYTHON" -m kvmpy.guestbuild >/dev/null
echo "setup: ok ($("$PYTHON" --version), $(gcc --version | head -1))"
