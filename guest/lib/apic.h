/* Local APIC access for guests, in xAPIC (MMIO) and x2APIC (MSR) mode, and SMP bring-up.
 *
 * Register names are the xAPIC MMIO offsets of SDM Vol. 3 Table 10-1; in x2APIC mode
 * the same register is MSR 0x800 + offset / 16 (SDM Table 10-6). Each CPU remembers the
 * mode it last set through this library, so apic_read()/apic_write() need no MSR read.
 */
#ifndef KVMPY_APIC_H
#define KVMPY_APIC_H

#include "kvmpy.h"

/* ---- Registers (SDM Table 10-1) ---- */
#define APIC_ID 0x20
#define APIC_VERSION 0x30
#define APIC_TPR 0x80
#define APIC_APR 0x90
#define APIC_PPR 0xa0
#define APIC_EOI 0xb0
#define APIC_RRD 0xc0
#define APIC_LDR 0xd0
#define APIC_DFR 0xe0
#define APIC_SVR 0xf0
#define APIC_ISR 0x100
#define APIC_TMR 0x180
#define APIC_IRR 0x200
#define APIC_ESR 0x280
#define APIC_ICR 0x300
#define APIC_ICR2 0x310
#define APIC_LVT_TIMER 0x320
#define APIC_LVT_THERMAL 0x330
#define APIC_LVT_PMC 0x340
#define APIC_LVT_LINT0 0x350
#define APIC_LVT_LINT1 0x360
#define APIC_LVT_ERROR 0x370
#define APIC_TIMER_INITIAL 0x380
#define APIC_TIMER_CURRENT 0x390
#define APIC_TIMER_DIVIDE 0x3e0
#define APIC_SELF_IPI 0x3f0     /* x2APIC only */

/* ---- MSRs ---- */
#define MSR_IA32_APIC_BASE 0x1b
#define APIC_BASE_BSP (1u << 8)
#define APIC_BASE_EXTD (1u << 10)   /* x2APIC mode */
#define APIC_BASE_EN (1u << 11)
#define APIC_BASE_ADDR_MASK 0xfffff000u
#define X2APIC_MSR(reg) (0x800u + ((reg) >> 4))
#define MSR_IA32_TSC_DEADLINE 0x6e0

/* ---- ICR fields (SDM Figure 10-12, 10-28) ---- */
#define APIC_DM_FIXED 0x000u
#define APIC_DM_LOWEST 0x100u
#define APIC_DM_SMI 0x200u
#define APIC_DM_NMI 0x400u
#define APIC_DM_INIT 0x500u
#define APIC_DM_STARTUP 0x600u
#define APIC_DEST_LOGICAL 0x800u
#define APIC_ICR_BUSY 0x1000u
#define APIC_INT_ASSERT 0x4000u
#define APIC_INT_LEVELTRIG 0x8000u
#define APIC_DEST_SELF 0x40000u
#define APIC_DEST_ALLINC 0x80000u
#define APIC_DEST_ALLBUT 0xc0000u
#define XAPIC_BROADCAST 0xffu
#define X2APIC_BROADCAST 0xffffffffu

/* ---- SVR, LVT, timer, ESR ---- */
#define APIC_SVR_ENABLE 0x100u
#define APIC_SPURIOUS_VECTOR 0xff
#define APIC_LVT_MASKED (1u << 16)
#define APIC_TIMER_ONESHOT (0u << 17)
#define APIC_TIMER_PERIODIC (1u << 17)
#define APIC_TIMER_TSC_DEADLINE (2u << 17)
#define APIC_TIMER_DIVIDE_1 0xbu
#define APIC_ESR_SEND_ILLEGAL_VECTOR (1u << 5)
#define APIC_ESR_RECV_ILLEGAL_VECTOR (1u << 6)

enum apic_mode { APIC_MODE_DISABLED = 0, APIC_MODE_XAPIC = 1, APIC_MODE_X2APIC = 2 };

/* This CPU's APIC mode as last set through apic_enable()/apic_set_base(). */
enum apic_mode apic_mode(void);
const char *apic_mode_name(enum apic_mode mode);

/* Writes IA32_APIC_BASE with wrmsr_safe and, if it took, records the mode it selects
 * (and the xAPIC MMIO base). Returns the fault vector, 0 if none. */
int apic_set_base(u64 value);
/* Switches this CPU to `mode` by architectural transitions (SDM 10.12.5: x2APIC ->
 * xAPIC goes through disabled), then software-enables it: SVR = enable | vector 0xff,
 * with a handler that ignores spurious interrupts. Returns 0, or the fault vector. */
int apic_enable(enum apic_mode mode);

/* 32-bit register access in this CPU's mode (x2APIC: the low half of the MSR). */
u32 apic_read(u32 reg);
void apic_write(u32 reg, u32 val);

/* The APIC ID: xAPIC ID[31:24], or the 32-bit x2APIC ID. */
u32 apic_id(void);
void apic_eoi(void);

/* Sends an IPI: `icr` is the low ICR word (vector, delivery mode, destination mode,
 * level, trigger, shorthand); `dest` is the destination field (8 bits in xAPIC mode,
 * written to ICR2[31:24] first; 32 bits in x2APIC mode, ICR[63:32]). xAPIC mode waits
 * (bounded) for the delivery-status bit to clear. */
void apic_send_ipi(u32 icr, u32 dest);

/* The x2APIC logical ID a CPU with x2APIC ID `id` has (SDM 10.12.10.2, cluster model). */
static inline u32 x2apic_ldr_of(u32 id) { return ((id >> 4) << 16) | (1u << (id & 0xf)); }

/* handler[vector] = h: called with the interrupt frame; fixed interrupts must EOI. */
void apic_set_handler(u32 vector, interrupt_handler h);

/* ---- SMP bring-up (SDM 8.4.4.1, "Typical BSP Initialization Sequence") ---- */

#define SMP_TRAMPOLINE_ADDR 0x8000u     /* page 8: SIPI vector 8; the MBI is at 0x9000 */
#define SMP_WAKE_VECTOR 0xf0            /* smp_call's wake-up IPI */

/* The number of CPUs the VMM offers: fw_cfg FW_CFG_NB_CPUS, else CPUID.1:EBX[23:16]. */
u32 smp_cpus_available(void);
/* Starts CPUs until `n` are online (this one included) with INIT, SIPI, SIPI: to all
 * excluding self when n is every CPU, else to APIC IDs 0..n-1 one by one. The APs
 * enable the BSP's APIC mode and call ap_main(). Returns how many CPUs came online
 * (n on success; fewer if some did not arrive within a bounded wait). */
u32 smp_start(u32 n);
/* Starts the CPUs with the given APIC IDs (the BSP's own is skipped) one by one with
 * INIT, SIPI, SIPI, as an OS does from its MADT; returns how many CPUs are online. */
u32 smp_start_ids(const u32 *ids, u32 count);
/* CPUs online, and the APIC ID CPU index `cpu` reported when it came up. */
u32 smp_online(void);
u32 smp_apic_id(u32 cpu);
u32 check_vector_counts(const char *name, volatile u32 (*count)[256], u32 (*expect)[256],
                        u32 ncpus);

/* An AP's C entry point, called with its CPU index once its APIC is enabled. The
 * library's weak default is smp_idle(). Returning parks the CPU (cli; hlt). */
void ap_main(u32 cpu);
/* Serves smp_call() requests, halting with interrupts enabled in between. */
void smp_idle(void) __attribute__((noreturn));
/* Runs fn(arg) on CPU `cpu` (which must be in smp_idle) and waits until it returns;
 * the CPU is woken with an IPI of SMP_WAKE_VECTOR. Returns 0, or -1 on timeout. */
int smp_call(u32 cpu, void (*fn)(void *), void *arg);

#endif
