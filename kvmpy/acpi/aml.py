"""The few AML encodings kvmpy's DSDT needs (ACPI 6.3 section 20, "ACPI Machine Language").

Only named objects with integer, string and package values, and the scopes and devices
that hold them: enough for the sleep-state packages (\\_S3_, \\_S5_) and the PNP device
descriptions of what kvmpy wires. Every builder returns the encoded bytes; nothing is
evaluated here (acpica's `acpiexec` does that in the tests).
"""

from __future__ import annotations

from collections.abc import Iterable

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # "\"
ONES_OP = 0xFF

MAX_PKG_LENGTH = (1 << 28) - 1


def name_seg(name: str) -> bytes:
    """A 4-character NameSeg (20.2.2): a lead character A-Z or _, then A-Z, 0-9 or _,
    padded with _ to four characters."""
    if not 1 <= len(name) <= 4 or not (name[0].isupper() or name[0] == "_"):
        raise ValueError(f"bad AML name segment {name!r}")
    if not all(c.isdigit() or c.isupper() or c == "_" for c in name):
        raise ValueError(f"bad AML name segment {name!r}")
    return name.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: an optional root prefix, then one NameSeg, or a dotted path of
    two segments (DualNamePrefix 0x2E) or more (MultiNamePrefix 0x2F)."""
    root = path.startswith("\\")
    segs = [s for s in path.lstrip("\\").split(".") if s]
    prefix = bytes([ROOT_CHAR]) if root else b""
    if not segs:
        return prefix + b"\x00"  # NullName
    body = b"".join(name_seg(s) for s in segs)
    if len(segs) == 1:
        return prefix + body
    if len(segs) == 2:
        return prefix + b"\x2e" + body
    return prefix + bytes([0x2F, len(segs)]) + body


def pkg_length(payload_len: int) -> bytes:
    """PkgLength (20.2.4) for `payload_len` bytes following it: the encoding counts its
    own bytes, 1 to 4 of them."""
    for extra in range(4):
        total = payload_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([lead]) + rest
    raise ValueError(f"AML package too long: {payload_len} bytes")


def integer(value: int) -> bytes:
    """The shortest integer encoding: Zero, One, Ones or a Byte/Word/DWord/QWord const."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"AML integer out of range: {value}")
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4),
                         (QWORD_PREFIX, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    """A String constant: ASCII, NUL-terminated."""
    data = text.encode("ascii")
    if b"\0" in data:
        raise ValueError("AML string contains NUL")
    return bytes([STRING_PREFIX]) + data + b"\0"


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0B00"): three letters and four hex digits packed into a DWord
    (compressed EISA ID, 6.1.5 _HID)."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"bad EISA id {text!r}")
    letters = [ord(c) - 0x40 for c in text[:3]]
    vendor = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    product = int(text[3:], 16)
    value = vendor.to_bytes(2, "big") + product.to_bytes(2, "big")
    return bytes([DWORD_PREFIX]) + value


def package(elements: Iterable[bytes]) -> bytes:
    """Package(N) { elements } (20.2.5.4, DefPackage)."""
    items = list(elements)
    if len(items) > 255:
        raise ValueError("AML package with more than 255 elements")
    body = bytes([len(items)]) + b"".join(items)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    """Buffer() { data } (DefBuffer): the size as an integer, then the bytes."""
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def name(path: str, value: bytes) -> bytes:
    """Name(path, value) (DefName)."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    """Scope(path) { terms } (DefScope)."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """Device(path) { terms } (DefDevice)."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


# --------------------------------------------------------------- resource templates
# ACPI 6.3 section 6.4 (resource data types), small resource descriptors.


def io_port(base: int, length: int, alignment: int = 1) -> bytes:
    """IO(Decode16, base, base, alignment, length) (6.4.2.5)."""
    return bytes([0x47, 0x01]) + base.to_bytes(2, "little") + base.to_bytes(2, "little") \
        + bytes([alignment, length])


def irq_no_flags(irq: int) -> bytes:
    """IRQNoFlags() {irq}: an edge-triggered, active-high ISA IRQ (6.4.2.1)."""
    return bytes([0x22]) + (1 << irq).to_bytes(2, "little")


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate() { descriptors }: a Buffer ending with an End Tag (6.4.2.9)
    whose checksum byte is 0 ("treated as if the checksum operation succeeded")."""
    return buffer(b"".join(descriptors) + bytes([0x79, 0x00]))
