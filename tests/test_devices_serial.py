"""16550A UART: reset values, transmit, divisor latch, receive queue, IER/IIR, FIFO, loopback."""

from __future__ import annotations

import io

import pytest

from kvmpy.bus import Bus
from kvmpy.devices.serial import (
    COM1_BASE,
    IIR_CTI,
    IIR_NO_INT,
    IIR_RDI,
    IIR_THRI,
    SERIAL_LENGTH,
    Serial16550,
)

THR, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7


class FlushCounter(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def make(**kwargs) -> tuple[Serial16550, FlushCounter, list[bool]]:
    out = FlushCounter()
    levels: list[bool] = []
    uart = Serial16550(out, irq=levels.append, **kwargs)
    return uart, out, levels


def rd(uart: Serial16550, reg: int) -> int:
    return uart.read(reg, 1)


def wr(uart: Serial16550, reg: int, val: int) -> None:
    uart.write(reg, 1, val)


def test_reset_values_match_qemu() -> None:
    uart, _, levels = make()
    assert [rd(uart, r) for r in (IER, IIR, LCR, MCR, LSR, MSR, SCR)] == [
        0x00,
        0x01,
        0x00,
        0x08,
        0x60,
        0xB0,
        0x00,
    ]
    assert rd(uart, THR) == 0  # nothing received
    assert levels == []


def test_transmit_goes_to_output_and_flushes_per_newline() -> None:
    uart, out, _ = make()
    for b in b"ok":
        wr(uart, THR, b)
    assert out.getvalue() == b"ok"
    assert out.flushes == 0
    wr(uart, THR, ord("\n"))
    assert out.flushes == 1
    assert uart.tx_bytes == 3
    assert rd(uart, LSR) == 0x60  # THR empty and transmitter empty at once


def test_through_the_bus() -> None:
    bus = Bus("pio")
    out = io.BytesIO()
    bus.register(COM1_BASE, SERIAL_LENGTH, Serial16550(out))
    for b in b"hello, world\n":
        bus.write(COM1_BASE, 1, b)
    assert out.getvalue() == b"hello, world\n"
    assert bus.read(COM1_BASE + LSR, 1) == 0x60


def test_divisor_latch() -> None:
    uart, out, _ = make()
    wr(uart, LCR, 0x83)  # DLAB, 8N1
    wr(uart, 0, 0x01)
    wr(uart, 1, 0x02)
    assert rd(uart, 0) == 0x01 and rd(uart, 1) == 0x02
    assert uart.divider == 0x0201
    assert out.getvalue() == b""  # DLL writes are not transmitted
    assert rd(uart, IER) == 0x02  # DLM, not IER, while DLAB is set
    wr(uart, LCR, 0x03)
    assert rd(uart, IER) == 0x00
    wr(uart, THR, ord("x"))
    assert out.getvalue() == b"x"
    assert uart.divider == 0x0201


def test_wide_access_is_split_into_bytes() -> None:
    uart, _, _ = make()
    wr(uart, LCR, 0x80)
    uart.write(0, 2, 0x3412)  # outw to DLL: DLL = 0x12, DLM = 0x34
    assert uart.divider == 0x3412
    assert uart.read(0, 2) == 0x3412
    assert uart.read(6, 4) == 0xFFFF_0000 | (0x00 << 8) | 0xB0  # MSR, SCR, two bytes past the end
    assert uart.unexpected_accesses == 3


def test_receive_through_rbr_and_dr() -> None:
    uart, _, _ = make()
    assert uart.feed(b"ab") == 2
    assert rd(uart, LSR) == 0x61
    assert rd(uart, THR) == ord("a")
    assert rd(uart, LSR) == 0x61
    assert rd(uart, THR) == ord("b")
    assert rd(uart, LSR) == 0x60
    assert uart.rx_bytes == 2


def test_receive_queue_is_bounded() -> None:
    uart, _, _ = make(rx_capacity=4)
    assert uart.feed(b"abc") == 3
    assert uart.feed(b"defg") == 1
    assert uart.rx_dropped == 3
    assert bytes(rd(uart, THR) for _ in range(4)) == b"abcd"
    assert rd(uart, LSR) & 1 == 0


def test_thri_interrupt_and_iir_read_clears_it() -> None:
    uart, _, levels = make()
    wr(uart, IER, 0x02)
    assert rd(uart, IIR) == IIR_THRI
    assert levels == [True, False]  # raised by IER, lowered by the IIR read
    assert rd(uart, IIR) == IIR_NO_INT
    wr(uart, THR, ord("z"))  # THR empties again: THRE interrupt again
    assert levels == [True, False, True]
    assert rd(uart, IIR) == IIR_THRI
    wr(uart, IER, 0x00)
    assert rd(uart, IIR) == IIR_NO_INT


def test_received_data_has_priority_over_thre() -> None:
    uart, _, levels = make()
    wr(uart, IER, 0x03)
    uart.feed(b"q")
    assert rd(uart, IIR) == IIR_RDI
    assert rd(uart, THR) == ord("q")
    assert rd(uart, IIR) == IIR_THRI  # THRI still pending underneath
    assert rd(uart, IIR) == IIR_NO_INT
    assert levels[-1] is False


def test_fifo_trigger_level_and_timeout() -> None:
    uart, _, _ = make()
    wr(uart, FCR, 0xC7)  # enable + clear both FIFOs, trigger level 14
    wr(uart, IER, 0x01)
    assert rd(uart, IIR) == 0xC0 | IIR_NO_INT
    uart.feed(b"x" * 3)
    assert rd(uart, IIR) == 0xC0 | IIR_CTI  # below the trigger level: character timeout
    uart.feed(b"y" * 11)
    assert rd(uart, IIR) == 0xC0 | IIR_RDI
    wr(uart, FCR, 0xC3)  # receiver FIFO reset
    assert rd(uart, LSR) == 0x60
    assert rd(uart, IIR) == 0xC0 | IIR_NO_INT
    wr(uart, FCR, 0x00)
    assert rd(uart, IIR) == IIR_NO_INT


def test_loopback_routes_transmit_to_receive_and_modem_lines() -> None:
    uart, out, _ = make()
    wr(uart, MCR, 0x10 | 0x02 | 0x08)  # LOOP, RTS, OUT2
    assert rd(uart, MSR) == 0x10 | 0x80  # CTS from RTS, DCD from OUT2
    wr(uart, THR, 0x55)
    assert out.getvalue() == b""
    assert rd(uart, LSR) == 0x61
    assert rd(uart, THR) == 0x55
    wr(uart, MCR, 0x08)
    assert rd(uart, MSR) == 0xB0


def test_scratch_register() -> None:
    uart, _, _ = make()
    wr(uart, SCR, 0xA5)
    assert rd(uart, SCR) == 0xA5


@pytest.mark.parametrize("output", [None, "closed"])
def test_no_output_or_broken_output_never_raises(output: str | None) -> None:
    stream = io.BytesIO()
    if output == "closed":
        stream.close()
    uart = Serial16550(stream if output else None)
    for b in b"data\n":
        wr(uart, THR, b)
    uart.flush()
    assert uart.tx_bytes == 5
    assert uart.output_errors == (6 if output else 0)  # 5 writes + the explicit flush


def test_reset_clears_state() -> None:
    uart, _, _ = make()
    uart.feed(b"abc")
    wr(uart, LCR, 0x9B)
    wr(uart, IER, 0x0F)
    uart.reset()
    assert rd(uart, LCR) == 0 and rd(uart, IER) == 0 and rd(uart, LSR) == 0x60
    assert uart.rx_pending == 0


def test_kvm_unit_tests_serial_init_and_put() -> None:
    """lib/x86/io.c: serial_init() then serial_put() polling LSR.THRE before each byte."""
    bus = Bus("pio")
    out = io.BytesIO()
    bus.register(COM1_BASE, SERIAL_LENGTH, Serial16550(out))
    base = COM1_BASE
    bus.write(base + 3, 1, bus.read(base + 3, 1) | 0x80)
    bus.write(base + 0, 1, 0x01)
    bus.write(base + 1, 1, 0x00)
    bus.write(base + 3, 1, bus.read(base + 3, 1) & ~0x80 & 0xFF)
    bus.write(base + 1, 1, 0x00)
    bus.write(base + 3, 1, 0x03)
    bus.write(base + 2, 1, 0x00)
    bus.write(base + 4, 1, 0x03)
    for ch in b"PASS\n":
        polls = 0
        while not bus.read(base + 5, 1) & 0x20:
            polls += 1
            assert polls < 3
        if ch == ord("\n"):
            bus.write(base, 1, ord("\r"))
        bus.write(base, 1, ch)
    assert out.getvalue() == b"PASS\r\n"
    assert bus.unclaimed_reads == 0
