"""PC devices for kvmpy's port I/O bus: pure models, no KVM in them; the VMM wires them.

Each device answers `read(offset, size)` / `write(offset, size, value)` relative to the
base it is registered at on a `kvmpy.bus.Bus`, and never raises on guest input.
"""

from kvmpy.devices.debug_exit import DEBUG_EXIT_BASE, DEBUG_EXIT_LENGTH, DebugExit
from kvmpy.devices.fw_cfg import FW_CFG_IO_BASE, FW_CFG_IO_LENGTH, FwCfg
from kvmpy.devices.pit import (
    PIT_BASE,
    PIT_LENGTH,
    SYSTEM_CONTROL_B_LENGTH,
    SYSTEM_CONTROL_B_PORT,
    Pit8254,
    SystemControlB,
)
from kvmpy.devices.serial import COM1_BASE, COM2_BASE, SERIAL_LENGTH, Serial16550

__all__ = [
    "COM1_BASE",
    "COM2_BASE",
    "DEBUG_EXIT_BASE",
    "DEBUG_EXIT_LENGTH",
    "FW_CFG_IO_BASE",
    "FW_CFG_IO_LENGTH",
    "PIT_BASE",
    "PIT_LENGTH",
    "SERIAL_LENGTH",
    "SYSTEM_CONTROL_B_LENGTH",
    "SYSTEM_CONTROL_B_PORT",
    "DebugExit",
    "FwCfg",
    "Pit8254",
    "Serial16550",
    "SystemControlB",
]
