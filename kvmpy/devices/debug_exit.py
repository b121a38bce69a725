"""QEMU's isa-debug-exit device (hw/misc/debugexit.c), as kvm-unit-tests uses it.

kvm-unit-tests runs QEMU with `-device isa-debug-exit,iobase=0xf4,iosize=0x4` and ends a
test with a 32-bit `outl` of its status to port 0xf4. A write of V asks the VMM to exit
with status (V << 1) | 1, V being the value masked to the access size (debug_exit_write
calls exit() with exactly that). Reads return 0. Accesses wider than 4 bytes are invalid
for the device (valid.max_access_size = 4) and are ignored and counted.
"""

from __future__ import annotations

from collections.abc import Callable

DEBUG_EXIT_BASE = 0xF4
DEBUG_EXIT_LENGTH = 4

_SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}


class DebugExit:
    """Port 0xf4 (length 4): a write calls `on_exit((value << 1) | 1)`.

    `on_exit` runs on the vCPU thread with the VM's exit lock held; it should request a
    shutdown and return rather than tear the VM down from inside the access.
    """

    def __init__(self, on_exit: Callable[[int], None], name: str = "isa-debug-exit") -> None:
        self.name = name
        self.on_exit = on_exit
        self.exit_writes = 0
        self.last_status: int | None = None  # the last (value << 1) | 1 passed to on_exit
        self.unexpected_accesses = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        mask = _SIZE_MASK.get(size)
        if mask is None:
            self.unexpected_accesses += 1
            return
        status = ((value & mask) << 1) | 1
        self.exit_writes += 1
        self.last_status = status
        self.on_exit(status)
