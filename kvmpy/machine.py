"""The Machine: guest memory, vCPUs, local APICs, device buses, and the VM lifecycle.

Lifecycle (Firecracker's `vmm` + kvmtool's `kvm.c`): `Machine(config)` creates the VM
and its devices, `load(image)` puts a guest in memory and sets the BSP's registers,
`start()` starts one thread per vCPU, `wait()` blocks until the VM ends and returns a
`VmResult`, `close()` releases every fd and mapping. The first event that ends the VM
(debug-exit write, triple fault, a fault inside kvmpy, `stop()`) wins: its status and
message are the result, and every vCPU thread is kicked out and joined.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from kvmpy import _core
from kvmpy.acpi import platform as acpi_platform
from kvmpy.apic import ApicBus, LocalApic
from kvmpy.apic.ioapic import IOAPIC_DEFAULT_BASE, IOAPIC_MMIO_SIZE, IoApic
from kvmpy.apic.timer import KVM_MIN_TIMER_PERIOD_NS
from kvmpy.boot import BootInfo, is_multiboot, load_flat, load_multiboot
from kvmpy.boot.bios import setup_bios_state
from kvmpy.boot.cpu import setup_protected_mode, setup_real_mode_sipi, write_boot_gdt
from kvmpy.bus import Bus
from kvmpy.cpuid import plan_cpuid, vcpu_cpuid
from kvmpy.cpumodel import HOST, CpuModel, check_host
from kvmpy.devices import DebugExit, FwCfg, Pit8254, Serial16550, SystemControlB
from kvmpy.devices.i8259 import (
    PIC_ELCR_BASE,
    PIC_MASTER_BASE,
    PIC_SLAVE_BASE,
    ElcrPorts,
    Pic8259Pair,
    PicPorts,
)
from kvmpy.devices.irq import IrqRouter, isa_gsi
from kvmpy.devices.pc_testdev import (
    PC_TESTDEV_BASE,
    PC_TESTDEV_IOMEM_BASE,
    PC_TESTDEV_IOMEM_LENGTH,
    PC_TESTDEV_IRQ_BASE,
    PC_TESTDEV_IRQ_LINES,
    PC_TESTDEV_LENGTH,
    PcTestdev,
    PcTestdevIomem,
    PcTestdevIrq,
)
from kvmpy.devices.pit_irq import PitIrq0
from kvmpy.errors import ImageError, KvmpyError
from kvmpy.kvm import Kvm, VcpuFd
from kvmpy.kvm import ioctls as k
from kvmpy.kvm import run as kr
from kvmpy.memory import GuestMemory
from kvmpy.timers import TimerCallback, TimerService
from kvmpy.trace import ExitStats
from kvmpy.vcpu import (
    HALT_POLL_NS_DEFAULT,
    KICK_SIGNAL,
    FastpathSetting,
    Vcpu,
    VcpuState,
)

if TYPE_CHECKING:
    from kvmpy.tracing.recorder import Tracer

# Process exit statuses. A debug-exit write of V gives (V << 1) | 1, always odd; every
# status kvmpy chooses itself is even, so the two never collide.
STATUS_OK = 0
STATUS_USAGE = 2  # bad command line or input file (the CLI)
STATUS_TRIPLE_FAULT = 4  # KVM_EXIT_SHUTDOWN
STATUS_GUEST_CRASH = 6  # internal error, failed entry, unhandled exit
STATUS_VMM_FAULT = 8  # an exception inside kvmpy (a bug): the VM is stopped cleanly
STATUS_HUNG = 10  # every vCPU halted with nothing that could ever wake one
STATUS_INTERRUPTED = 130  # SIGINT (128 + 2)
STATUS_TERMINATED = 143  # SIGTERM (128 + 15)

TSS_ADDRESS = 0xFFFB_D000
IDENTITY_MAP_ADDRESS = 0xFFFB_C000
MIN_MEMORY = 1 << 20
MAX_VCPUS = 255  # xAPIC physical IDs; x2APIC would allow more, KVM here allows 1024
HUNG_GRACE_S = 0.5


@dataclass
class MachineConfig:
    """What a user chooses on the command line."""

    cpus: int = 1
    memory: int = 64 << 20
    cmdline: str = ""
    initrd: bytes | None = None
    initrd_name: str = "initrd"  # the module's command line (QEMU passes the file name)
    serial: BinaryIO | None = None  # None: the process's stdout
    # "native" (True): the C fastpath before the GIL; "python": exits.handle_exit_irqoff
    # under the GIL; "off" (False): every exit to the dispatch.
    fastpath: bool | str = True
    ap_start: str = "sipi"  # "sipi": APs wait for INIT-SIPI; "entry": all start at entry
    irqchip: str = "user"  # "user": kvmpy's APIC; "kernel": KVM's in-kernel irqchip
    record_time: bool = True
    kvm_path: str = "/dev/kvm"
    halt_poll_ns: int = HALT_POLL_NS_DEFAULT  # maximum halt-polling window; 0: never poll
    # Shortest period of a periodic APIC timer (KVM's min_timer_period_us); 0: no clamp.
    min_timer_period_us: int = KVM_MIN_TIMER_PERIOD_NS // 1000
    # Thread placement: "auto" pins vCPU i to the i-th usable host CPU when every vCPU
    # gets its own; "on" pins round-robin anyway; "off" lets the scheduler place them.
    pin_vcpus: str = "auto"
    cpu: CpuModel = HOST  # CPUID model and the APIC features it offers (`--cpu`)
    pit: bool = True  # the 8254 at 0x40, port 0x61 and IRQ 0 (QEMU `-machine pit=off`)

    def validate(self) -> None:
        if not 1 <= self.cpus <= MAX_VCPUS:
            raise KvmpyError(f"--cpus must be between 1 and {MAX_VCPUS}, got {self.cpus}")
        if self.memory < MIN_MEMORY or self.memory % 4096:
            raise KvmpyError(
                f"--memory must be at least 1M and a multiple of 4K, got {self.memory} bytes"
            )
        if self.irqchip not in ("user", "kernel"):
            raise KvmpyError(f"--irqchip must be 'user' or 'kernel', got {self.irqchip!r}")
        if not 0 <= self.halt_poll_ns <= 1_000_000_000:
            raise KvmpyError(f"--halt-poll-ns must be between 0 and 1e9, got {self.halt_poll_ns}")
        if not 0 <= self.min_timer_period_us <= 1_000_000:
            raise KvmpyError("--min-timer-period-us must be between 0 and 1e6, got "
                             f"{self.min_timer_period_us}")
        if self.pin_vcpus not in ("auto", "on", "off"):
            raise KvmpyError(f"--pin-vcpus must be auto, on or off, got {self.pin_vcpus!r}")
        try:
            FastpathSetting.parse(self.fastpath)
        except ValueError as exc:
            raise KvmpyError(f"--fastpath: {exc}") from None
        if self.ap_start not in ("sipi", "entry"):
            raise KvmpyError(f"ap_start must be 'sipi' or 'entry', got {self.ap_start!r}")


@dataclass(frozen=True)
class VmResult:
    """How the VM ended: the process exit status and one line saying why."""

    status: int
    message: str
    stats: ExitStats = field(repr=False, compare=False, default_factory=ExitStats)


class Machine:
    """One virtual machine."""

    def __init__(self, config: MachineConfig, kvm: Kvm | None = None) -> None:
        config.validate()
        self.config = config
        self.kvm = kvm or Kvm.open(config.kvm_path)
        self._own_kvm = kvm is None
        self.kvm.require_caps()
        check_host(config.cpu, has_hyperv=self.kvm.check_extension(k.KVM_CAP_HYPERV) > 0)
        self.stopping = False
        self.exit_lock = threading.Lock()  # the srcu_read_lock analogue (DESIGN.md)
        self._result: VmResult | None = None
        self._result_lock = threading.Lock()
        self._done = threading.Event()
        self._blocked = 0
        self._blocked_lock = threading.Lock()
        # Halt polling: the window's maximum, and the host CPUs the vCPU threads may use
        # (a vCPU polls only while the busy vCPUs fit on them; KVM: single_task_running).
        self.halt_poll_max_ns = config.halt_poll_ns
        self._host_cpu_list = sorted(os.sched_getaffinity(0))
        self._host_cpus = len(self._host_cpu_list)
        self._started = False
        self.tracer: Tracer | None = None  # kvmpy.tracing.probes.attach() sets it
        self.timers = TimerService()
        self.kernel_irqchip = config.irqchip == "kernel"
        self.vm = self.kvm.create_vm()
        try:
            self._setup_vm()
            self.memory = GuestMemory(config.memory)
            for region in self.memory.regions:
                self.vm.set_user_memory_region(
                    region.slot, region.gpa, region.size, region.host_address
                )
            self._setup_devices()
            self.apic_bus = ApicBus(self._notify_vcpu)
            self.vcpus: list[Vcpu] = []
            self.cpuid = plan_cpuid(self.kvm.supported_cpuid(), config.cpu,
                                    irqchip=config.irqchip, backend=self.kvm.backend)
            maxphyaddr = self.cpuid.maxphyaddr
            for i in range(config.cpus):
                fd = self.vm.create_vcpu(i)
                fd.set_cpuid(vcpu_cpuid(self.cpuid, i, config.cpus))
                self.tsc_hz = fd.get_tsc_khz() * 1000
                apic: LocalApic | None = None
                if not self.kernel_irqchip:
                    apic = LocalApic(
                        i, self.apic_bus, bsp=(i == 0), clock_ns=time.monotonic_ns,
                        tsc_line=_guest_tsc_line(fd), tsc_hz=self.tsc_hz, maxphyaddr=maxphyaddr,
                        x2apic_supported=config.cpu.x2apic,
                        tsc_deadline_supported=config.cpu.tsc_deadline,
                        min_periodic_ns=config.min_timer_period_us * 1000,
                        lint0_extint_at_reset=(i == 0),
                    )
                    fd_sregs = fd.get_sregs()  # KVM's view of IA32_APIC_BASE starts as ours
                    fd_sregs.apic_base = apic.apic_base
                    fd.set_sregs(fd_sregs)
                    self.apic_bus.add(apic)
                vcpu = Vcpu(self, i, fd, apic, fastpath=config.fastpath,
                            stats=ExitStats(config.record_time))
                self.vcpus.append(vcpu)
            # The native exit core (kvmpy/native): the vCPU loops, the fastpath, the kick.
            self.fastpath = FastpathSetting.parse(config.fastpath)
            self.core = _core.Core(config.cpus, self._host_cpus, config.halt_poll_ns,
                                   self.fastpath.value if not self.kernel_irqchip
                                   else FastpathSetting.OFF.value)
            # Interrupts ride on KVM_RUN (kvm_run.s.regs.events) instead of a
            # KVM_INTERRUPT ioctl where KVM offers it (vcpu_loop.c kvm_queue_interrupt).
            sync_regs = self.kvm.check_extension(k.KVM_CAP_SYNC_REGS)
            self.core.set(sync_events=int(bool(sync_regs & k.KVM_SYNC_X86_EVENTS)))
            for vcpu in self.vcpus:
                vcpu.attach_core(self.core)
            self.apic_bus.core = self.core
            self._setup_interrupts()
            # The RTC, the ACPI PM registers and tables, S3/S5 (None only in test doubles).
            self.acpi: acpi_platform.Acpi | None = acpi_platform.install(self)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- setup

    def _setup_vm(self) -> None:
        vm = self.vm
        try:
            vm.set_identity_map_addr(IDENTITY_MAP_ADDRESS)
        except OSError:
            pass  # not needed on every backend
        vm.set_tss_addr(TSS_ADDRESS)
        vm.enable_cap(
            k.KVM_CAP_X86_USER_SPACE_MSR,
            k.KVM_MSR_EXIT_REASON_INVAL | k.KVM_MSR_EXIT_REASON_UNKNOWN
            | k.KVM_MSR_EXIT_REASON_FILTER,
        )
        if self.kernel_irqchip:
            # The reference: KVM's own PIC/IOAPIC/LAPIC, x2APIC and fastpath.
            vm.create_irqchip()
            return
        # No in-kernel irqchip: x2APIC MSRs (0x800-0x8ff) exit as INVAL, IA32_APIC_BASE
        # and TSC_DEADLINE are denied by the filter so reads and writes both exit.
        from kvmpy.apic import MSR_APIC_BASE, MSR_TSC_DEADLINE

        vm.set_msr_filter([MSR_APIC_BASE, MSR_TSC_DEADLINE])

    def _setup_devices(self) -> None:
        cfg = self.config
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        out = cfg.serial if cfg.serial is not None else sys.stdout.buffer
        self.serial = Serial16550(out)
        self.debug_exit = DebugExit(self._debug_exit)
        self.fw_cfg = FwCfg(cfg.cpus, cfg.memory)
        self.pit = Pit8254(time.monotonic_ns)
        self.port61 = SystemControlB(self.pit)
        self.pio_bus.register(0x3F8, 8, self.serial)
        self.pio_bus.register(0xF4, 4, self.debug_exit)
        self.pio_bus.register(0x510, 2, self.fw_cfg)
        if cfg.pit:
            self.pio_bus.register(0x40, 4, self.pit)
            self.pio_bus.register(0x61, 1, self.port61)

    def _setup_interrupts(self) -> None:
        """GSI lines into the I/O APIC: kvmpy's (irqchip=user, at 0xFEC00000 on the MMIO
        bus, EOIs from the APIC bus) or KVM's (KVM_IRQ_LINE); pc-testdev and COM1 (GSI 4)
        drive them, and with kvmpy's the PIT's OUT0 drives ISA IRQ 0 (GSI 2)."""
        self.ioapic: IoApic | None = None
        self.pic: Pic8259Pair | None = None
        self.pit_irq0: PitIrq0 | None = None
        if self.kernel_irqchip:
            self.irq = IrqRouter(self.vm.irq_line)
        else:
            self.ioapic = IoApic(self.apic_bus, defer=self._defer_ioapic)
            self._ioapic_retry = TimerCallback(self.ioapic.service_deferred)
            self.mmio_bus.register(IOAPIC_DEFAULT_BASE, IOAPIC_MMIO_SIZE, self.ioapic)
            self.pic = Pic8259Pair(self._pic_output)
            self.pio_bus.register(PIC_MASTER_BASE, 2, PicPorts(self.pic, 0))
            self.pio_bus.register(PIC_SLAVE_BASE, 2, PicPorts(self.pic, 1))
            self.pio_bus.register(PIC_ELCR_BASE, 2, ElcrPorts(self.pic))
            self.irq = IrqRouter(self._set_gsi)
        if not self.kernel_irqchip and self.config.pit:
            self.pit_irq0 = PitIrq0(self.pit, self.irq.line(isa_gsi(0)), self._arm_pit,
                                    time.monotonic_ns)
            self._pit_timer = TimerCallback(self.pit_irq0.tick)
            self.pit.on_channel0_change = self.pit_irq0.reschedule
        self.serial.irq = self.irq.line(4).set
        self.pc_testdev = PcTestdev(self.memory.flush_page)
        self.pio_bus.register(PC_TESTDEV_BASE, PC_TESTDEV_LENGTH, self.pc_testdev)
        self.pio_bus.register(PC_TESTDEV_IRQ_BASE, PC_TESTDEV_IRQ_LINES,
                              PcTestdevIrq(self.irq))
        self.mmio_bus.register(PC_TESTDEV_IOMEM_BASE, PC_TESTDEV_IOMEM_LENGTH, PcTestdevIomem())

    def _set_gsi(self, gsi: int, level: bool) -> None:
        """A GSI line: to the I/O APIC pin, and ISA IRQs also to the 8259 (QEMU's
        gsi_handler; GSI 2 is ISA IRQ 0, the PIC's IRQ 2 is the cascade)."""
        self.ioapic.set_irq(gsi, level)
        if gsi < 16:
            self.pic.set_irq(0 if gsi == 2 else gsi, level)

    def _pic_output(self, level: bool) -> None:
        """The 8259's INTR changed: every APIC learns it (R_EXTINT for the native core),
        and a vCPU whose APIC takes it (LINT0 ExtINT) must look."""
        for vcpu in getattr(self, "vcpus", ()):
            if vcpu.apic is not None:
                vcpu.apic.set_extint_line(level)
                if level and vcpu.apic.accepts_pic_interrupts():
                    vcpu.kick()

    def _arm_pit(self, deadline_ns: int) -> None:
        self.timers.arm(self._pit_timer, deadline_ns)

    def _defer_ioapic(self, delay_ns: int) -> None:
        """The I/O APIC throttles a level-interrupt storm: retry after `delay_ns`."""
        self.timers.arm(self._ioapic_retry, time.monotonic_ns() + delay_ns)

    # ---------------------------------------------------------------- loading

    def load(self, image: bytes, *, flat: bool = False, name: str | None = None) -> BootInfo:
        """Load a multiboot image (or, with `flat`, a raw 32-bit binary at 1 MiB) and set
        up the vCPUs to run it. `name` (the image's file name) becomes the first word of
        the multiboot command line, as QEMU does: kvm-unit-tests reads argv[0] there."""
        mem = self.memory
        cfg = self.config
        if flat:  # a raw binary: no BIOS ran before it
            boot = load_flat(mem, image)
        elif is_multiboot(image):
            setup_bios_state(mem, self.pic)  # first: where the image overlaps it, it wins
            modules = [(cfg.initrd, cfg.initrd_name)] if cfg.initrd is not None else []
            boot = load_multiboot(mem, image, cmdline=cfg.cmdline, modules=modules,
                                  kernel_name=name)
        else:
            raise ImageError("not a multiboot image (no multiboot header in its first 8 KiB); "
                             "use --flat for a raw binary")
        write_boot_gdt(mem)
        for vcpu in self.vcpus:
            if vcpu.index == 0 or self.config.ap_start == "entry":
                setup_protected_mode(vcpu.fd, entry=boot.entry, eax=boot.eax, ebx=boot.ebx)
                vcpu.state = VcpuState.RUNNABLE
                if self.kernel_irqchip:
                    vcpu.fd.set_mp_state(k.KVM_MP_STATE_RUNNABLE)
            elif self.kernel_irqchip:
                vcpu.state = VcpuState.RUNNABLE  # KVM_RUN blocks in-kernel until INIT-SIPI
            else:
                vcpu.state = VcpuState.WAIT_FOR_SIPI
        return boot

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self.tracer is not None:
            if threading.current_thread() is threading.main_thread():
                self.tracer.install_signal_probe(KICK_SIGNAL)
        self._started = True
        _ = self.pinning  # decided before the vCPU threads add to the load
        self.timers.start()
        if self.pit_irq0 is not None:
            self.pit_irq0.reschedule()  # the PIT counts from reset (mode 3, 18.2 Hz)
        for vcpu in self.vcpus:
            t = threading.Thread(target=self._vcpu_thread, args=(vcpu,),
                                 name=f"kvmpy-vcpu{vcpu.index}", daemon=True)
            vcpu.thread = t
            t.start()

    def host_cpu_for(self, vcpu: Vcpu) -> int | None:
        """The host CPU vCPU thread `vcpu` is pinned to, or None (see `pinning`)."""
        return self.pinning[0][vcpu.index] if self.pinning[0] else None

    @functools.cached_property
    def pinning(self) -> tuple[list[int], str]:
        """Where the vCPU threads go (`--pin-vcpus`), decided once at start, and why.

        Why pin: a vCPU that wakes another (an IPI to a halted target) would otherwise
        often have the target placed on its own core by the scheduler's wake-affine
        logic, preempting the sender: two context switches per IPI. Measured here:
        vmexit_ipi 185 -> 100 us p50 with 2 vCPUs on 2 cores. But a pinned thread
        cannot leave a core that other work keeps busy, so "auto" pins only when the
        vCPUs fit on the host's CPUs beside the load already there (the 1-minute load
        average, taken before the vCPUs run). Returns (host CPU per vCPU, or [] for
        none; the reason, which `--stat` prints)."""
        pin, n, cpus = self.config.pin_vcpus, len(self.vcpus), self._host_cpus
        spread = [self._host_cpu_list[i % cpus] for i in range(n)]
        if pin == "off":
            return [], "not pinned (--pin-vcpus off)"
        if pin == "on":
            return spread, "pinned round-robin (--pin-vcpus on)"
        if n > cpus:
            return [], f"not pinned (auto: {n} vCPUs > {cpus} host CPUs)"
        load = os.getloadavg()[0]
        if n + load > cpus + 0.5:
            return [], (f"not pinned (auto: {n} vCPUs + host load {load:.1f} do not fit "
                        f"{cpus} host CPUs)")
        return spread, (f"pinned to host CPUs {','.join(map(str, spread))} (auto: {n} vCPUs "
                        f"+ host load {load:.1f} fit {cpus} host CPUs)")

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        try:
            cpu = self.host_cpu_for(vcpu)
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})  # 0: this thread (Linux affinity is per task)
            vcpu.run_loop()
        except BaseException as exc:  # noqa: BLE001 - a bug in kvmpy must not hang the VM
            self.vmm_fault(f"vCPU {vcpu.index}", exc)
        finally:
            vcpu.state = VcpuState.STOPPED
            self._check_all_stopped()

    def _check_all_stopped(self) -> None:
        if all(v.state is VcpuState.STOPPED for v in self.vcpus):
            self.stop(STATUS_OK, "all vCPUs stopped")
            self._done.set()

    def wait(self, timeout: float | None = None) -> VmResult:
        """Block until the VM ends (or `timeout` s: then stop it) and return how it ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.wait(0.1):
            if self._hung():
                self.stop(STATUS_HUNG, "the guest entered ACPI S3 with no wake-up source "
                          "(PM1_EN.RTC_EN and the RTC's AIE)"
                          if self.acpi is not None and self.acpi.sleep.asleep
                          else "every vCPU is halted and nothing can wake one: the guest hung")
            if deadline is not None and time.monotonic() > deadline:
                self.stop(STATUS_VMM_FAULT, f"timed out after {timeout} s")
        self._join()
        result = self._result or VmResult(STATUS_OK, "stopped")
        return VmResult(result.status, result.message, self.merged_stats())

    def run(self, timeout: float | None = None) -> VmResult:
        """start() then wait()."""
        self.start()
        try:
            return self.wait(timeout)
        except KeyboardInterrupt:
            self.stop(STATUS_INTERRUPTED, "interrupted (SIGINT)")
            return self.wait(5)

    def stop(self, status: int, message: str) -> None:
        """End the VM: the first caller's status and message are the result."""
        with self._result_lock:
            if self._result is None:
                self._result = VmResult(status, message)
        self.stopping = True
        core = getattr(self, "core", None)
        if core is not None:
            core.stop()  # every vCPU leaves the core: in the guest, polling or asleep
        if not self._started:
            self._done.set()

    def _join(self) -> None:
        me = threading.current_thread()
        for vcpu in self.vcpus:
            if vcpu.thread is not None and vcpu.thread is not me:
                vcpu.thread.join(timeout=5)
                if vcpu.thread.is_alive():
                    print(f"kvmpy: vCPU {vcpu.index} did not stop", file=sys.stderr)
        self.timers.stop()
        tracer, core = getattr(self, "tracer", None), getattr(self, "core", None)
        if tracer is not None and core is not None and tracer.timer_ring.native is not None:
            # The core's timer thread has stopped (core.stop joins it): its records.
            tracer.timer_ring.native_count = core.timer_trace_count()

    @property
    def result(self) -> VmResult | None:
        return self._result

    def close(self) -> None:
        """Stop if running and release every fd and mapping (idempotent)."""
        if self._started and not self._done.is_set():
            self.stop(STATUS_OK, "closed")
            self.wait(5)
        # Drop every reference to the core: it releases its views of the kvm_run pages
        # (an exported mmap cannot close) and of the APIC memory.
        self.core = None
        if hasattr(self, "apic_bus"):
            self.apic_bus.core = None
        for vcpu in getattr(self, "vcpus", []):
            vcpu.core = None
            vcpu.fd.before_ioctl = None
        for vcpu in getattr(self, "vcpus", []):
            vcpu.fd.close()
        if hasattr(self, "memory"):
            self.memory.close()
        self.vm.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- events from vCPUs

    def _debug_exit(self, status: int) -> None:
        self.stop(status, f"guest wrote {status >> 1:#x} to the debug-exit port")

    def guest_crash(self, vcpu: Vcpu, what: str) -> None:
        """A guest failure that ends the VM: say which vCPU, the exit, RIP and instruction."""
        from kvmpy.diagnose import describe

        status = STATUS_TRIPLE_FAULT if "triple fault" in what else STATUS_GUEST_CRASH
        self.stop(status, f"vCPU {vcpu.index}: {what} at {describe(vcpu)}")

    def vmm_fault(self, where: str, exc: BaseException) -> None:
        """An exception inside kvmpy: stop the VM cleanly, naming where it happened."""
        tb = traceback.extract_tb(exc.__traceback__)
        at = f" ({os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name})" \
            if tb else ""
        if os.environ.get("KVMPY_DEBUG"):
            traceback.print_exception(exc)
        self.stop(STATUS_VMM_FAULT,
                  f"internal error in {where}: {type(exc).__name__}: {exc}{at}")

    def _notify_vcpu(self, index: int) -> None:
        """ApicBus callback: a request for vCPU `index` was published; kick it."""
        self.vcpus[index].kick()

    def on_init(self, vcpu: Vcpu) -> None:
        """INIT (SDM 10.4.7.3, 8.4): the vCPU resets and waits for a SIPI (KVM's
        kvm_apic_accept_events: the BSP too, as kvmpy has no firmware to reset into)."""
        vcpu.state = VcpuState.WAIT_FOR_SIPI

    def poll_sipi(self, vcpu: Vcpu) -> None:
        """In wait-for-SIPI: start the vCPU in real mode at vector << 12 on a SIPI.

        An INIT received meanwhile just resets the APIC and keeps waiting; a SIPI that
        came with it is checked in the same pass, so nothing pending is left behind
        when the vCPU goes back to sleep."""
        if self.acpi is not None and self.acpi.sleep.take_resume(vcpu):  # waking from S3
            vcpu.state = VcpuState.RUNNABLE
            return
        apic = vcpu.apic
        apic.take_init()
        vector = apic.take_sipi()
        if vector is not None:
            setup_real_mode_sipi(vcpu.fd, vector)
            vcpu.state = VcpuState.RUNNABLE

    def note_blocked(self, vcpu: Vcpu, blocked: bool) -> None:
        """Python's own sleeps (wait-for-SIPI, HLT with IF=0): counted for diagnostics.
        Polling and the hang check use the core's count (`core.busy()`), which covers
        the halts the core sleeps too."""
        with self._blocked_lock:
            self._blocked += 1 if blocked else -1
            self._blocked_since = time.monotonic()

    def _hung(self) -> bool:
        """Every vCPU asleep (in the core or in Python) for a while, no timer armed,
        nothing pending anywhere."""
        if self.core is None or self.core.busy() > 0 or self.stopping:
            self._all_asleep_since = None
            return False
        now = time.monotonic()
        if getattr(self, "_all_asleep_since", None) is None:
            self._all_asleep_since = now
        if now - self._all_asleep_since < HUNG_GRACE_S:
            return False
        if self.ioapic is not None and self.ioapic.deferred:
            return False  # a storm-delayed level interrupt is on its way
        bsp = self.vcpus[0]
        if self.pic is not None and self.pit_irq0 is not None and not self.pic.masked(0) \
                and bsp.view.u8[kr.IF_FLAG] and bsp.apic.accepts_pic_interrupts():
            return False  # the PIT ticks through the 8259 to the BSP, which can take it
        if self.acpi is not None and self.acpi.sleep.can_wake():
            return False  # asleep in S3 with the RTC alarm armed to wake it
        for vcpu in self.vcpus:
            if vcpu.apic is None:
                return False  # in-kernel irqchip: HLT never reaches kvmpy
            if vcpu._timer_deadline is not None or vcpu.apic.has_pending_events():
                return False
        return self.core.busy() == 0

    def merged_stats(self) -> ExitStats:
        total = ExitStats()
        for vcpu in self.vcpus:
            total.merge(vcpu.collect_stats())
        return total


MSR_IA32_TSC = 0x10


def _guest_tsc_line(fd: VcpuFd) -> tuple[int, int]:
    """The vCPU's TSC read once through KVM_GET_MSRS, and the time.monotonic_ns() of the
    reading: LocalApic extrapolates from it at KVM's TSC rate (KVM_GET_TSC_KHZ) for
    TSC-deadline arithmetic, and so does the core (it is published to it)."""
    tsc0 = fd.get_msrs([MSR_IA32_TSC])[0]
    return tsc0, time.monotonic_ns()
