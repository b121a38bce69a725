"""QEMU's fw_cfg, I/O-port interface only (hw/nvram/fw_cfg.c, docs/specs/fw_cfg.rst).

One device at port 0x510, two ports wide (QEMU's "comb" region, FW_CFG_CTL_SIZE):
a 16-bit write at 0x510 selects an item and rewinds its offset (fw_cfg_select); each
8-bit read at 0x510 or 0x511 returns the next byte of the selected item and advances
(fw_cfg_data_read), 0 past its end. Byte writes (the long-deprecated data write) do
nothing. Other sizes are invalid for the region (fw_cfg_comb_valid): ignored and
counted, reads of them return 0. Unknown or invalid keys read as 0. No DMA interface:
FW_CFG_ID reports the traditional interface only.

kvm-unit-tests (lib/x86/fwcfg.c, fwcfg_get_u) does `outw(key, 0x510)` then `bytes` times
`inb(0x511)`, little-endian; it reads FW_CFG_NB_CPUS (u16) and FW_CFG_RAM_SIZE (u64).
"""

from __future__ import annotations

import struct

FW_CFG_IO_BASE = 0x510
FW_CFG_IO_LENGTH = 2

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF  # ~(WRITE_CHANNEL | ARCH_LOCAL)
FW_CFG_INVALID = 0xFFFF

FW_CFG_VERSION = 0x01  # FW_CFG_ID bit 0: traditional interface (bit 1 would be DMA)
FW_CFG_MAX_FILE_PATH = 56  # including the terminating NUL
FW_CFG_MAX_FILES = FW_CFG_ENTRY_MASK + 1 - FW_CFG_FILE_FIRST

_EMPTY = b""


class FwCfg:
    """fw_cfg items for a PC with `nr_cpus` CPUs and `ram_size` bytes of RAM."""

    def __init__(
        self,
        nr_cpus: int,
        ram_size: int,
        *,
        files: dict[str, bytes] | None = None,
        max_cpus: int | None = None,
        name: str = "fw_cfg",
    ) -> None:
        if not 1 <= nr_cpus <= 0xFFFF:
            raise ValueError(f"fw_cfg: nr_cpus out of range: {nr_cpus}")
        if max_cpus is None:
            max_cpus = nr_cpus
        if not nr_cpus <= max_cpus <= 0xFFFF:
            raise ValueError(f"fw_cfg: max_cpus {max_cpus} below nr_cpus or too large")
        if not 0 <= ram_size < 1 << 64:
            raise ValueError(f"fw_cfg: ram_size out of range: {ram_size}")
        self.name = name
        self.unexpected_accesses = 0
        self._items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", FW_CFG_VERSION),
            FW_CFG_UUID: bytes(16),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 0),
            FW_CFG_NB_CPUS: struct.pack("<H", nr_cpus),
            FW_CFG_BOOT_MENU: struct.pack("<H", 0),
            FW_CFG_MAX_CPUS: struct.pack("<H", max_cpus),
        }
        self._files: dict[str, bytes] = {}
        for path, data in (files or {}).items():
            self._check_file(path, data)
            self._files[path] = bytes(data)
        self._rebuild_files()
        self._cur_key = FW_CFG_INVALID
        self._cur_data = _EMPTY
        self._cur_offset = 0

    # -- host side ---------------------------------------------------------------

    def set_item(self, key: int, data: bytes) -> None:
        """Add or replace a numbered item (keys below FW_CFG_FILE_FIRST, or arch-local)."""
        if key & FW_CFG_WRITE_CHANNEL or key & FW_CFG_ENTRY_MASK >= FW_CFG_FILE_FIRST:
            raise ValueError(f"fw_cfg: key {key:#x} is not a numbered item (use add_file)")
        self._items[key] = bytes(data)

    def add_file(self, path: str, data: bytes) -> None:
        """Add or replace a named file; the directory (FW_CFG_FILE_DIR) is rebuilt."""
        self._check_file(path, data)
        self._files[path] = bytes(data)
        self._rebuild_files()

    def item(self, key: int) -> bytes:
        """The bytes the guest reads after selecting `key` (b"" when unknown)."""
        return self._items.get(key & ~FW_CFG_WRITE_CHANNEL, _EMPTY)

    def file_key(self, path: str) -> int:
        """The select key of file `path` (KeyError if absent)."""
        for key, (name, _size) in self._file_keys.items():
            if name == path:
                return key
        raise KeyError(path)

    @staticmethod
    def _check_file(path: str, data: bytes) -> None:
        encoded = path.encode()
        if not encoded or len(encoded) >= FW_CFG_MAX_FILE_PATH or b"\0" in encoded:
            raise ValueError(f"fw_cfg: bad file name {path!r} (1..55 bytes, no NUL)")
        if len(data) >= 1 << 32:
            raise ValueError(f"fw_cfg: file {path!r} too large")

    def _rebuild_files(self) -> None:
        """Files get keys from FW_CFG_FILE_FIRST in name order (fw_cfg_add_file_callback)."""
        if len(self._files) > FW_CFG_MAX_FILES:
            raise ValueError("fw_cfg: too many files")
        for key in [k for k in self._items if FW_CFG_FILE_FIRST <= k <= FW_CFG_ENTRY_MASK]:
            del self._items[key]
        directory = [struct.pack(">I", len(self._files))]
        self._file_keys: dict[int, tuple[str, int]] = {}
        for i, path in enumerate(sorted(self._files)):
            key = FW_CFG_FILE_FIRST + i
            data = self._files[path]
            self._items[key] = data
            self._file_keys[key] = (path, len(data))
            # struct FWCfgFile: be32 size, be16 select, u16 reserved, char name[56]
            directory.append(struct.pack(">IHH56s", len(data), key, 0, path.encode()))
        self._items[FW_CFG_FILE_DIR] = b"".join(directory)

    # -- bus interface -----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if size != 1 or not 0 <= offset < FW_CFG_IO_LENGTH:
            self.unexpected_accesses += 1
            return 0
        data = self._cur_data
        pos = self._cur_offset
        if pos < len(data):
            self._cur_offset = pos + 1
            return data[pos]
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 2 and offset == 0:
            self.select(value & 0xFFFF)
        elif size == 1 and 0 <= offset < FW_CFG_IO_LENGTH:
            pass  # data write: read-only since QEMU 2.4 (fw_cfg_write)
        else:
            self.unexpected_accesses += 1

    def select(self, key: int) -> None:
        """fw_cfg_select(): choose an item and rewind; unknown keys (FW_CFG_INVALID too) read 0."""
        self._cur_key = key
        self._cur_offset = 0
        self._cur_data = self._items.get(key & ~FW_CFG_WRITE_CHANNEL, _EMPTY)
