/*
 * The local APIC operations the native fastpath needs, on LocalApic's own memory
 * (core.h). Each mirrors a method of kvmpy/apic/lapic.py or kvmpy/apic/bus.py, which
 * stay the reference semantics; tests/test_native_differential.py runs both on the
 * same inputs and compares the whole APIC state. Anything this file does not cover
 * returns FASTPATH_NONE before any side effect, and Python's slow path handles it.
 */
#define _GNU_SOURCE
#include <string.h>

#include "core.h"

#define DM_FIXED 0
#define DM_LOWEST 1
#define ICR_DEST_LOGICAL (1u << 11)
#define SH_NONE 0
#define SH_SELF 1
#define SH_ALL_BUT 3
#define SVR_FOCUS_DISABLED (1u << 9)
#define DFR_MODEL_FLAT 0xFu
/* x2APIC ICR reserved bits 13, 17:16, 31:20 (#GP), SDM 10.12.9 */
#define X2APIC_ICR_RESERVED ((1ull << 13) | (0x3ull << 16) | (0xFFFull << 20))

/* Highest vector whose byte is set, or -1 (the register's highest bit, SDM 10.8.4). */
int lapic_highest(const uint8_t *vectors)
{
	const uint8_t *p = memrchr(vectors, 1, 256);
	return p ? (int)(p - vectors) : -1;
}

/* LocalApic.pending_vector: the highest IRR vector whose class is above PPR's, with
 * the APIC software-enabled (SDM 10.8.3.1); -1 if none. IRR is read while senders
 * set bits: a bit missed here was published before its kick, which makes the vCPU
 * look again (the kick protocol). */
int lapic_pending_vector(struct vcpu *v)
{
	struct lapic *a = &v->apic;
	int vector = lapic_highest(a->irr);
	if (vector < 0 || (vector >> 4) <= (int)(a->r[R_PPR] >> 4) || !a->r[R_SW_ENABLED])
		return -1;
	return vector;
}

/* LocalApic._update_ppr (SDM 10.8.3.1): TPR if TPR[7:4] >= ISRV[7:4], else
 * ISRV[7:4] << 4. ISR, TPR and PPR are written only by the owner thread. */
void lapic_update_ppr(struct vcpu *v)
{
	struct lapic *a = &v->apic;
	int isrv = lapic_highest(a->isr);
	uint32_t tpr = a->r[R_TPR];
	if (isrv < 0 || (tpr & 0xF0) >= ((uint32_t)isrv & 0xF0))
		a->r[R_PPR] = tpr;
	else
		a->r[R_PPR] = (uint32_t)isrv & 0xF0;
}

/* LocalApic.ack (INTA, SDM 10.8.4): IRR -> ISR, update PPR. */
void lapic_ack(struct vcpu *v, int vector)
{
	struct lapic *a = &v->apic;
	/* acq_rel: senders set IRR bytes concurrently; the exchange takes this one. */
	atomic_exchange_explicit((_Atomic uint8_t *)&a->irr[vector], 0, memory_order_acq_rel);
	a->isr[vector] = 1;
	lapic_update_ppr(v);
	atomic_fetch_add_explicit((_Atomic uint64_t *)&a->q[Q_INJECTED], 1, memory_order_relaxed);
}

/*
 * IRR[vector] = 1 as ONE atomic exchange; true if the byte was set already (the
 * interrupt merged with a pending one, SDM 10.8.4). For Python's senders
 * (LocalApic.accept_fixed, through Core.irr_test_and_set): the owner takes IRR bytes
 * here without the GIL (lapic_ack, an exchange too), so Python's read, then store
 * could read 1, lose the byte to that INTA, store it again and call it a merge; a
 * sender that skips its kick on a merge (docs/hacking.md) would then leave the
 * interrupt with nobody to kick for it. Of two exchanges on the byte one sees the
 * other, as pi_test_and_set_pir. acq_rel: the release publishes the TMR byte and the
 * interrupt before the kick's seq_cst request store, as deliver_fixed's release store
 * does; the acquire pairs with lapic_ack's exchange. On x86-64: one xchg.
 */
bool lapic_irr_test_and_set(struct lapic *a, int vector)
{
	return atomic_exchange_explicit((_Atomic uint8_t *)&a->irr[vector], 1,
					memory_order_acq_rel) != 0;
}

/* LocalApic.halt_ends_at_once: would a HLT executed now end at once? Events only
 * Python handles (NMI, INIT) end it; a maskable interrupt only with IF=1. */
bool lapic_halt_ends_at_once(struct vcpu *v, bool if_flag)
{
	/* acquire: pairs with the release store of a Python sender's accept_*(). */
	if (atomic_load_explicit((_Atomic uint32_t *)&v->apic.r[R_SLOW_EVENTS],
				 memory_order_acquire))
		return true;
	if (if_flag && atomic_load_explicit((_Atomic uint32_t *)&v->apic.r[R_EXTINT],
					    memory_order_acquire))
		return true; /* the 8259's INTR (R_EXTINT), injected by Python */
	return if_flag && lapic_pending_vector(v) >= 0;
}

/* LocalApic.accept_fixed for a legal vector with edge trigger, then the kick
 * (ApicBus._deliver: publish, then notify). */
static void deliver_fixed(struct vcpu *src, struct vcpu *t, int vector, int dm)
{
	struct lapic *a = &t->apic;
	if (src->trace) { /* before the IRR store, as Tracer.send */
		int flags = 0;
		if (!a->r[R_SW_ENABLED] || a->r[R_MODE] == APIC_DISABLED)
			flags = SEND_REJECTED;
		else if (atomic_load_explicit((_Atomic uint8_t *)&a->irr[vector],
					      memory_order_relaxed))
			flags = SEND_COALESCED;
		trace_rec(src, TR_SEND, t->index, vector | dm << 8 | flags << 12);
	}
	if (!a->r[R_SW_ENABLED] || a->r[R_MODE] == APIC_DISABLED) {
		atomic_fetch_add_explicit((_Atomic uint64_t *)&a->q[Q_RX_REJECTED], 1,
					  memory_order_relaxed);
		return;
	}
	/* TMR before IRR, so the owner never sees the IRR bit with a stale trigger mode;
	 * relaxed: the release of the IRR store below orders it. */
	atomic_store_explicit((_Atomic uint8_t *)&a->tmr[vector], 0, memory_order_relaxed);
	/* release: publishes the interrupt before the kick's seq_cst request store. */
	atomic_store_explicit((_Atomic uint8_t *)&a->irr[vector], 1, memory_order_release);
	atomic_fetch_add_explicit((_Atomic uint64_t *)&a->q[Q_RX_FIXED], 1, memory_order_relaxed);
	int mode = kvm_vcpu_kick(t, src);
	if (src->trace)
		trace_rec(src, TR_KICK, t->index,
			  mode == IN_GUEST ? (t == src ? KICK_HOW_SELF : KICK_HOW_SIGNAL)
			  : mode == BLOCKED ? KICK_HOW_WAKE : KICK_HOW_NONE);
}

/* A routing word of another vCPU's APIC (mode, xAPIC ID, LDR, DFR), loaded whole.
 * relaxed: its owner stores it in its own exit handling (Python, under the GIL) and
 * publishes nothing else with it. A sender racing the store routes by the old or the new
 * value, as an IPI racing an ID change may on hardware; a sender the guest told of the
 * change (through guest memory) loads after the owner re-entered the guest, and that
 * KVM_RUN entry (a syscall: a full barrier) follows the store. */
static inline uint32_t peer_reg(const struct lapic *a, int r)
{
	return atomic_load_explicit((_Atomic uint32_t *)&a->r[r], memory_order_relaxed);
}

/* On the bus (not globally disabled, bus.py) and destination.py match_physical
 * (SDM 10.6.2.1): the x2APIC ID in x2APIC mode, else the 8-bit xAPIC ID. */
static bool has_physical_id(struct vcpu *t, uint32_t dest)
{
	uint32_t mode = peer_reg(&t->apic, R_MODE);
	if (mode == APIC_DISABLED)
		return false;
	return dest == peer_reg(&t->apic, mode == APIC_X2APIC ? R_APIC_ID : R_XAPIC_ID);
}

/* ApicBus._physical_target: the APIC at index `dest` if it has that ID (kvmpy's
 * numbering), else the first with it; NULL if none. IDs are found by scanning the
 * vCPUs' own ID words, not through a map (KVM's kvm_recalculate_apic_map): the words are
 * the Python model's, so the scan can never disagree with it and there is nothing to
 * rebuild or publish; it costs two loads per vCPU, as the logical and broadcast loops
 * below, and is reached only when the APIC at index `dest` does not have the ID. */
static struct vcpu *physical_target(struct vm *vm, uint32_t dest)
{
	if (dest < (uint32_t)vm->nvcpus && has_physical_id(vm->vcpus[dest], dest))
		return vm->vcpus[dest];
	for (int i = 0; i < vm->nvcpus; i++)
		if (has_physical_id(vm->vcpus[i], dest))
			return vm->vcpus[i];
	return NULL;
}

/* destination.py match_logical (SDM 10.6.2.2, 10.12.10.2) */
static bool match_logical(struct vcpu *t, uint32_t dest)
{
	struct lapic *a = &t->apic;
	if (peer_reg(a, R_MODE) == APIC_X2APIC) {
		uint32_t ldr = a->r[R_X2APIC_LDR]; /* fixed by the x2APIC ID */
		return (dest >> 16) == (ldr >> 16) && (dest & ldr & 0xFFFF) != 0;
	}
	uint32_t logical_id = peer_reg(a, R_LDR) >> 24, mda = dest & 0xFF;
	if ((peer_reg(a, R_DFR) >> 28) == DFR_MODEL_FLAT)
		return (mda & logical_id) != 0;
	return (mda >> 4) == (logical_id >> 4) && (mda & logical_id & 0xF) != 0;
}

/* ApicBus._lowest_priority (SDM 10.6.2.4): the focus processor, else the lowest PPR,
 * ties to the lowest index. Other APICs' PPR is read racily, as on the Python side. */
static struct vcpu *lowest_priority(struct vcpu *src, int vector, uint32_t dest,
				    bool broadcast, struct vcpu *skip)
{
	struct vm *vm = src->vm;
	struct vcpu *best = NULL;
	for (int i = 0; i < vm->nvcpus; i++) {
		struct vcpu *t = vm->vcpus[i];
		struct lapic *a = &t->apic;
		if (t == skip || peer_reg(a, R_MODE) == APIC_DISABLED || !a->r[R_SW_ENABLED])
			continue;
		if (!broadcast && !match_logical(t, dest))
			continue;
		if (!(a->r[R_SVR] & SVR_FOCUS_DISABLED) &&
		    (atomic_load_explicit((_Atomic uint8_t *)&a->irr[vector], memory_order_relaxed) ||
		     a->isr[vector]))
			return t;
		if (!best || a->r[R_PPR] < best->apic.r[R_PPR])
			best = t;
	}
	return best;
}

/* An IPI that found no destination (ApicBus: stats "ipi_no_target"). */
static void count_no_target(struct lapic *sa)
{
	atomic_fetch_add_explicit((_Atomic uint64_t *)&sa->q[Q_IPI_NO_TARGET], 1,
				  memory_order_relaxed);
}

/* Deliver to the one target routing chose, or count that there was none. */
static void deliver_or_count(struct vcpu *src, struct vcpu *t, int vector, int dm)
{
	if (t)
		deliver_fixed(src, t, vector, dm);
	else
		count_no_target(&src->apic);
}

/*
 * An ICR write of a fixed or lowest-priority IPI with a legal vector, in either mode:
 * `low` is ICR[31:0] as stored, `dest` ICR[63:32] (x2APIC) or ICR[63:56] (xAPIC).
 * ApicBus.send_ipi's routing for those modes. Other delivery modes (NMI, INIT, SIPI,
 * SMI, reserved) and an illegal vector (an ESR error) return NONE with nothing done:
 * Python's slow path sends them. APIC IDs software changed are routed here too.
 */
enum fastpath lapic_icr_write_fast(struct vcpu *src, uint32_t low, uint32_t dest)
{
	struct vm *vm = src->vm;
	struct lapic *sa = &src->apic;
	int vector = low & 0xFF, dm = (low >> 8) & 7, sh = (low >> 18) & 3;
	bool x2 = sa->r[R_MODE] == APIC_X2APIC;

	if ((dm != DM_FIXED && dm != DM_LOWEST) || vector < 16)
		return FASTPATH_NONE;
	sa->r[R_ICR_LOW] = low;
	if (x2)
		sa->r[R_ICR_DEST] = dest;
	atomic_fetch_add_explicit((_Atomic uint64_t *)&sa->q[Q_IPI_SENT], 1, memory_order_relaxed);

	if (sh == SH_SELF) {
		deliver_fixed(src, src, vector, dm);
		return FASTPATH_REENTER_GUEST;
	}
	bool logical = low & ICR_DEST_LOGICAL;
	bool broadcast = sh != SH_NONE || dest == (x2 ? 0xFFFFFFFFu : 0xFFu);
	if (!broadcast && !logical) {
		/* relaxed: Python stores it in the exit that stored the ID (peer_reg). */
		if (dm == DM_FIXED && atomic_load_explicit(&vm->renumbered, memory_order_relaxed)) {
			/* IDs may alias (bus.py): every APIC with the ID takes a fixed IPI. */
			bool hit = false;
			for (int i = 0; i < vm->nvcpus; i++) {
				if (has_physical_id(vm->vcpus[i], dest)) {
					hit = true;
					deliver_fixed(src, vm->vcpus[i], vector, dm);
				}
			}
			if (!hit)
				count_no_target(sa);
			return FASTPATH_REENTER_GUEST;
		}
		deliver_or_count(src, physical_target(vm, dest), vector, dm);
		return FASTPATH_REENTER_GUEST;
	}
	struct vcpu *skip = sh == SH_ALL_BUT ? src : NULL;
	if (dm == DM_LOWEST) {
		deliver_or_count(src, lowest_priority(src, vector, dest, broadcast, skip), vector, dm);
		return FASTPATH_REENTER_GUEST;
	}
	for (int i = 0; i < vm->nvcpus; i++) {
		struct vcpu *t = vm->vcpus[i];
		if (t == skip || peer_reg(&t->apic, R_MODE) == APIC_DISABLED)
			continue;
		if (broadcast || match_logical(t, dest))
			deliver_fixed(src, t, vector, dm);
	}
	return FASTPATH_REENTER_GUEST;
}

/* x2APIC ICR (MSR 0x830), upstream kvm_x2apic_icr_write_fast: reserved bits first,
 * no side effect on refusal; bit 12 (delivery status) is dropped. */
enum fastpath lapic_x2apic_icr_write_fast(struct vcpu *v, uint64_t value)
{
	if (v->apic.r[R_MODE] != APIC_X2APIC || (value & X2APIC_ICR_RESERVED))
		return FASTPATH_NONE;
	return lapic_icr_write_fast(v, (uint32_t)value & 0xFFFFEFFFu, (uint32_t)(value >> 32));
}

/* SELF IPI (MSR 0x83F, SDM 10.12.11): fixed, edge, to self. */
enum fastpath lapic_self_ipi_fast(struct vcpu *v, uint64_t value)
{
	struct lapic *a = &v->apic;
	if (a->r[R_MODE] != APIC_X2APIC || (value & ~0xFFull) || value < 16)
		return FASTPATH_NONE;
	atomic_fetch_add_explicit((_Atomic uint64_t *)&a->q[Q_SELF_IPI], 1, memory_order_relaxed);
	atomic_fetch_add_explicit((_Atomic uint64_t *)&a->q[Q_IPI_SENT], 1, memory_order_relaxed);
	deliver_fixed(v, v, (int)value, DM_FIXED);
	return FASTPATH_REENTER_GUEST;
}

/* LocalApic.eoi_fast: EOI of an edge-triggered vector; a level-triggered one (TMR
 * set) must reach the I/O APIC, and an EOI with nothing in service is counted by
 * Python: both NONE, nothing done. */
enum fastpath lapic_eoi_fast(struct vcpu *v)
{
	struct lapic *a = &v->apic;
	int vector = lapic_highest(a->isr);
	/* relaxed: TMR of an in-service vector was written before its IRR bit, which the
	 * owner took with acquire in lapic_ack. */
	if (vector < 0 || a->r[R_MODE] == APIC_DISABLED ||
	    atomic_load_explicit((_Atomic uint8_t *)&a->tmr[vector], memory_order_relaxed))
		return FASTPATH_NONE;
	a->isr[vector] = 0;
	lapic_update_ppr(v);
	atomic_fetch_add_explicit((_Atomic uint64_t *)&a->q[Q_EOI], 1, memory_order_relaxed);
	trace_rec(v, TR_EOI, vector, 0);
	return FASTPATH_REENTER_GUEST;
}


/*
 * IA32_TSC_DEADLINE write at `now` (the exit's time): LocalApic.wrmsr with
 * ApicTimer.set_tsc_deadline, then Vcpu.sync_timer (SDM 10.5.4.1), for the plain cases:
 * the APIC enabled, its timer in TSC-deadline mode, no expiry due, and a deadline in
 * the future (armed) or 0 (disarmed). Python's: a write outside TSC-deadline mode
 * (ignored and counted; without CPUID TSC-deadline the mode cannot be set, and the
 * write #GPs there), an expiry due (its _timer_catch_up fires it first), a deadline
 * already passed (it fires at once: Python's expiry path) and no published TSC line
 * (Q_TSC_HZ 0). Under --trace the timer thread records its firings itself (timer.c).
 */
enum fastpath lapic_tsc_deadline_fast(struct vcpu *v, uint64_t value, uint64_t now)
{
	struct lapic *a = &v->apic;
	uint64_t *q = a->q, hz = q[Q_TSC_HZ], deadline = 0;
	if (!hz || a->r[R_MODE] == APIC_DISABLED ||
	    a->r[R_TIMER_MODE] != TIMER_TSC_DEADLINE)
		return FASTPATH_NONE;
	if ((q[Q_TIMER_DEADLINE] && now >= q[Q_TIMER_DEADLINE]) || now < q[Q_TSC_REF_NS])
		return FASTPATH_NONE;
	if (value) {
		/* LocalApic._tsc_on_line: tsc0 + (now - t0) * hz // 10**9 */
		unsigned __int128 tsc_now = q[Q_TSC_REF] +
			(unsigned __int128)(now - q[Q_TSC_REF_NS]) * hz / 1000000000u;
		if (value <= tsc_now)
			return FASTPATH_NONE;
		/* now + ceil((value - tsc_now) * 10**9 / hz) */
		unsigned __int128 ns = now + ((value - tsc_now) * 1000000000u + hz - 1) / hz;
		if (ns > UINT64_MAX)
			return FASTPATH_NONE;
		deadline = (uint64_t)ns;
	}
	/* Owner-only words (this vCPU's thread; Python reads them on the same thread). */
	q[Q_TSC_DEADLINE] = value;
	q[Q_TIMER_DEADLINE] = deadline;
	timer_arm(v, deadline);
	return FASTPATH_REENTER_GUEST;
}
