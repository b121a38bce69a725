"""A 16550A UART (COM1 at 0x3f8), after QEMU's hw/char/serial.c.

Transmission is instantaneous: a THR write goes straight to the host `output`, so LSR
always shows THRE | TEMT (0x60) and DR when received input is pending. Input arrives
through `feed()` into a bounded host-side queue (the chardev side of QEMU's UART): the
guest reads it through RBR whether or not the FIFO is enabled; bytes beyond the bound
are dropped and counted. IER/IIR follow serial_update_irq(), with the FIFO timeout
(CTI) taken as already elapsed whenever the FIFO holds data below its trigger level.
The interrupt line is reported through the optional `irq` callback (level, on change).

`feed()` may be called from a host input thread (the queue is a deque); call it with the
VM's exit lock held if the IIR/irq state must be exact at that instant.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import BinaryIO

from kvmpy.devices.byte_access import read_bytewise, write_bytewise

COM1_BASE = 0x3F8
COM2_BASE = 0x2F8
SERIAL_LENGTH = 8
FIFO_DEPTH = 16
DEFAULT_RX_CAPACITY = 4096

# Register offsets.
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C
IIR_ID = 0x0E
IIR_FIFO_ENABLED = 0xC0

FCR_FE = 0x01  # FIFO enable
FCR_RFR = 0x02  # receiver FIFO reset
FCR_XFR = 0x04  # transmitter FIFO reset
FCR_STICKY = 0xC9  # FE, DMA mode select, trigger level: the bits QEMU keeps

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_ANY_DELTA = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_DCD = 0x80

TRIGGER_LEVELS = (1, 4, 8, 14)  # FCR bits 7:6

_BYTES = [bytes((b,)) for b in range(256)]  # one-byte writes without allocating


class Serial16550:
    """A 16550A UART; register it on the PIO bus at COM1_BASE with length SERIAL_LENGTH."""

    def __init__(
        self,
        output: BinaryIO | None,
        name: str = "ttyS0",
        *,
        rx_capacity: int = DEFAULT_RX_CAPACITY,
        irq: Callable[[bool], None] | None = None,
    ) -> None:
        if rx_capacity < 1:
            raise ValueError(f"rx_capacity must be positive: {rx_capacity}")
        self.name = name
        self.output = output
        self.irq = irq
        self.rx_capacity = rx_capacity
        self._rx: deque[int] = deque()
        self.tx_bytes = 0  # bytes the guest transmitted (loopback included)
        self.rx_bytes = 0  # bytes the guest read from RBR
        self.rx_dropped = 0  # fed bytes dropped because the queue was full
        self.output_errors = 0  # host write/flush failures (the byte is lost)
        self.unexpected_accesses = 0
        self.irq_level = False
        self.reset()

    def reset(self) -> None:
        """Power-on state, as serial_reset()."""
        self.ier = 0
        self.iir = IIR_NO_INT
        self.lcr = 0
        self.mcr = MCR_OUT2
        self.msr = MSR_DCD | MSR_DSR | MSR_CTS
        self.scr = 0
        self.fcr = 0
        self.divider = 0x0C  # 9600 baud
        self.thr_ipending = False
        self._rx.clear()
        self._update_irq()

    # -- host side ---------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were accepted."""
        room = self.rx_capacity - len(self._rx)
        accepted = min(room, len(data))
        if accepted < len(data):
            self.rx_dropped += len(data) - accepted
        if accepted > 0:
            self._rx.extend(data[:accepted])
            self._update_irq()
        return accepted

    @property
    def rx_pending(self) -> int:
        """Bytes fed but not yet read by the guest."""
        return len(self._rx)

    # -- bus interface -----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if size == 1 and 0 <= offset < SERIAL_LENGTH:
            return self._read_reg(offset)
        self.unexpected_accesses += 1  # counted, then served byte by byte as on ISA
        return read_bytewise(self._read_reg, offset, size, SERIAL_LENGTH)

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1 and 0 <= offset < SERIAL_LENGTH:
            self._write_reg(offset, value & 0xFF)
            return
        self.unexpected_accesses += 1
        write_bytewise(self._write_reg, offset, size, value, SERIAL_LENGTH)

    # -- registers (serial_ioport_read / serial_ioport_write) ----------------------

    def _read_reg(self, reg: int) -> int:
        if reg == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                return self.divider & 0xFF
            if not self._rx:
                return 0
            self.rx_bytes += 1
            byte = self._rx.popleft()
            self._update_irq()
            return byte
        if reg == IER_DLM:
            return (self.divider >> 8) & 0xFF if self.lcr & LCR_DLAB else self.ier
        if reg == IIR_FCR:
            ret = self.iir
            if ret & IIR_ID == IIR_THRI:
                self.thr_ipending = False
                self._update_irq()
            return ret
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if reg == MSR:
            if self.mcr & MCR_LOOP:
                # Modem outputs wired back to inputs: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
                return (
                    ((self.mcr & 0x0C) << 4)
                    | ((self.mcr & MCR_RTS) << 3)
                    | ((self.mcr & MCR_DTR) << 5)
                )
            ret = self.msr
            if ret & MSR_ANY_DELTA:
                self.msr &= 0xF0
                self._update_irq()
            return ret
        return self.scr  # SCR

    def _write_reg(self, reg: int, val: int) -> None:
        if reg == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                self.divider = (self.divider & 0xFF00) | val
            else:
                self._transmit(val)
        elif reg == IER_DLM:
            if self.lcr & LCR_DLAB:
                self.divider = (self.divider & 0x00FF) | (val << 8)
                return
            changed = (self.ier ^ val) & 0x0F
            self.ier = val & 0x0F
            if changed & IER_THRI:
                # A rising THRI with THR empty raises THRE again (QEMU, Bochs, Windows rely on it).
                self.thr_ipending = bool(self.ier & IER_THRI)
            if changed:
                self._update_irq()
        elif reg == IIR_FCR:
            if (val ^ self.fcr) & FCR_FE:
                val |= FCR_XFR | FCR_RFR
            if val & FCR_RFR:
                self._rx.clear()
            if val & FCR_XFR:
                self.thr_ipending = True
            self.fcr = val & FCR_STICKY
            if self.fcr & FCR_FE:
                self.iir |= IIR_FIFO_ENABLED
            else:
                self.iir &= ~IIR_FIFO_ENABLED & 0xFF
            self._update_irq()
        elif reg == LCR:
            self.lcr = val
        elif reg == MCR:
            self.mcr = val & 0x1F
        elif reg == SCR:
            self.scr = val
        # LSR and MSR writes are ignored, as in QEMU.

    def _transmit(self, byte: int) -> None:
        """THR write: the byte leaves at once (serial_xmit), THR is empty again."""
        self.tx_bytes += 1
        if self.mcr & MCR_LOOP:
            if len(self._rx) < self.rx_capacity:
                self._rx.append(byte)
            else:
                self.rx_dropped += 1
        elif self.output is not None:
            try:
                self.output.write(_BYTES[byte])
                if byte == 0x0A:
                    self.output.flush()
            except (OSError, ValueError):  # closed or broken host stream: drop the byte
                self.output_errors += 1
        self.thr_ipending = True
        self._update_irq()

    def flush(self) -> None:
        """Flush host output (call at shutdown; output is otherwise flushed per newline)."""
        if self.output is not None:
            try:
                self.output.flush()
            except (OSError, ValueError):
                self.output_errors += 1

    def _update_irq(self) -> None:
        """Recompute IIR and the interrupt line, as serial_update_irq()."""
        ier = self.ier
        pending = len(self._rx)
        fifo = self.fcr & FCR_FE
        if ier & IER_RDI and pending and fifo and pending < self._trigger_level():
            iid = IIR_CTI  # character timeout: data below the trigger level, taken as timed out
        elif ier & IER_RDI and pending:
            iid = IIR_RDI
        elif ier & IER_THRI and self.thr_ipending:
            iid = IIR_THRI
        elif ier & IER_MSI and self.msr & MSR_ANY_DELTA:
            iid = IIR_MSI
        else:
            iid = IIR_NO_INT
        self.iir = iid | (self.iir & 0xF0)
        level = iid != IIR_NO_INT
        if level != self.irq_level:
            self.irq_level = level
            if self.irq is not None:
                self.irq(level)

    def _trigger_level(self) -> int:
        return TRIGGER_LEVELS[self.fcr >> 6]
