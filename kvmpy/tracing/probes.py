"""Wiring a Tracer into a Machine: each hook is an attribute that is None when tracing
is off (one branch at each hook point), set here to a ring's bound method or the Tracer.

Hook points (see recorder.py for what each records):
- Vcpu.tracer (the vCPU's Ring): run loop entry and exit around ``run()``, fastpath or
  slow-path result, injection, halt / wait-for-SIPI / wake, and ``kick()`` (recorded in
  the kicking thread's ring);
- LocalApic.on_eoi / on_timer_irq: the EOI of a vector, the timer's vector in IRR;
- ApicBus.tracer: every IPI (fixed, lowest, NMI, INIT, SIPI, SMI, self IPI) just before
  it is published in the target, recorded in the sender's ring;
- TimerService.tracer: each host timer firing (the timer thread's ring);
- Machine.tracer: the kick signal's Python handler on the main thread;
- the serial console's output: lines, with the time of their newline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

from kvmpy.errors import KvmpyError

from .recorder import DEFAULT_EVENTS, FIELDS, LINE_MAX, Ring, Tracer, now_ns

if TYPE_CHECKING:
    from kvmpy.machine import Machine


class ConsoleTap:
    """Passes serial output through and hands each complete line to the Tracer."""

    def __init__(self, out: BinaryIO | None, tracer: Tracer) -> None:
        self.out = out
        self.tracer = tracer
        self._line = bytearray()

    def write(self, data: bytes) -> int:
        for byte in data:
            if byte == 0x0A:
                self.tracer.console_line(self._line.decode("utf-8", "replace").rstrip("\r"))
                self._line.clear()
            elif len(self._line) < LINE_MAX:
                self._line.append(byte)
        if self.out is not None:
            return self.out.write(data)
        return len(data)

    def flush(self) -> None:
        if self.out is not None:
            self.out.flush()


def attach(machine: Machine, events: int = DEFAULT_EVENTS) -> Tracer:
    """Create a Tracer for ``machine`` (before ``start()``) and set every hook."""
    if machine._started:
        raise KvmpyError("tracing must be attached before the VM starts")
    try:
        tracer = Tracer(len(machine.vcpus), events)
    except ValueError as exc:
        raise KvmpyError(str(exc)) from None
    for vcpu, ring in zip(machine.vcpus, tracer.vcpu_rings, strict=True):
        vcpu.tracer = ring
        # The native core records this vCPU's exits, injections, EOIs, sends and kicks
        # into a ring of its own beside the Python one (merged by time on export).
        ring.native = bytearray(events * FIELDS * 8)
        machine.core.trace_attach(vcpu.index, ring.native)
        if vcpu.apic is not None:
            vcpu.apic.on_eoi = ring.eoi
            vcpu.apic.on_timer_irq = ring.timer_irq
    # The core's timer thread (the TSC-deadline writes the fastpath armed) records its
    # firings and kicks beside Python's TimerService, in the same "timer thread" ring.
    tracer.timer_ring.native = bytearray(events * FIELDS * 8)
    machine.core.timer_trace_attach(tracer.timer_ring.native)
    machine.apic_bus.tracer = tracer
    machine.timers.tracer = tracer
    machine.tracer = tracer

    def resolver(ident: int) -> Ring | None:
        for vcpu, ring in zip(machine.vcpus, tracer.vcpu_rings, strict=True):
            if vcpu.thread_ident == ident:
                return ring
        timer_thread = machine.timers._thread
        if timer_thread is not None and timer_thread.ident == ident:
            return tracer.timer_ring
        return None

    tracer.resolver = resolver
    machine.serial.output = ConsoleTap(machine.serial.output, tracer)
    cfg = machine.config
    tracer.meta.update({
        "vcpus": len(machine.vcpus), "fastpath": cfg.fastpath, "irqchip": cfg.irqchip,
        "events_per_ring": events, "tsc_hz": getattr(machine, "tsc_hz", 0),
    })
    # Guest TSC at a reference time, per vCPU: kvmpy's own extrapolation (KVM_GET_MSRS
    # once, then KVM_GET_TSC_KHZ), the one its TSC-deadline timer uses.
    now = now_ns()
    tsc = []
    for vcpu in machine.vcpus:
        apic = vcpu.apic
        if apic is not None and apic.tsc_at is not None:
            tsc.append({"vcpu": vcpu.index, "ref_ns": now, "tsc": apic.tsc_at(now)})
    tracer.meta["tsc_map"] = tsc
    return tracer
