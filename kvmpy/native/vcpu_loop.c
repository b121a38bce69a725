/*
 * The vCPU run loop in C, with the GIL released (KVM's vcpu_enter_guest, kvmtool's
 * kvm-cpu.c). It mirrors kvmpy/vcpu.py and the seed's shape:
 *
 *     inject pending events
 *     exit = run()                          -- KVM_RUN, the exit read once
 *     fp = handle_exit_irqoff(exit)         -- the fastpath
 *     REENTER_GUEST: loop; HLT: poll, then block
 *     else return the exit to Python        -- handle_exit under the GIL
 *
 * Nothing vCPU-wide stores the exit reason for others: the exit lives in the fields
 * the loop fills and hands back to its caller (owner-only).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/ioctl.h>

#include "core.h"

#define MSR_TSC_DEADLINE 0x6E0
#define MSR_X2APIC_EOI 0x80B
#define MSR_X2APIC_ICR 0x830
#define MSR_X2APIC_SELF_IPI 0x83F
#define XAPIC_EOI 0x0B0
#define XAPIC_ICR_LOW 0x300
#define XAPIC_ICR_LOW_WRITABLE (0x000CCFFFu & ~(1u << 12))
#define HALT_POLL_GROW 2
#define HALT_POLL_GROW_START_NS 10000
#define HALT_POLL_SHRINK 2

static bool slow_events(struct vcpu *v)
{
	/* acquire: pairs with Python's store after it published an NMI/INIT/SIPI/SMI. */
	return atomic_load_explicit((_Atomic uint32_t *)&v->apic.r[R_SLOW_EVENTS],
				    memory_order_acquire) != 0;
}

/* The 8259's INTR, up and taken by LINT0 (R_EXTINT): an ExtINT goes before the APIC's
 * vectors (KVM's kvm_cpu_get_interrupt), and its INTA is the 8259's, in Python
 * (vcpu.py _inject_pending_events): the core hands over when it can be injected, and
 * asks for an interrupt window when it cannot. */
static bool extint(struct vcpu *v)
{
	/* acquire: pairs with Python's store after the 8259's output changed. */
	return atomic_load_explicit((_Atomic uint32_t *)&v->apic.r[R_EXTINT],
				    memory_order_acquire) != 0;
}

static bool timer_due(struct vcpu *v)
{
	uint64_t deadline = v->apic.q[Q_TIMER_DEADLINE]; /* owner-only (Python sync_timer) */
	return deadline && now_ns() >= deadline;
}

/*
 * Queue a maskable interrupt for the next entry (KVM's kvm_queue_interrupt, which
 * KVM_INTERRUPT calls). Each vCPU ioctl but KVM_RUN costs a vcpu_load/vcpu_put, ~10 us
 * on kvm_pvm (as much as the rest of an exit): where KVM_CAP_SYNC_REGS gave us the
 * events KVM stored at the last exit, and nothing changed them since, the interrupt
 * rides on the next KVM_RUN instead: sync_regs -> kvm_vcpu_ioctl_x86_set_vcpu_events
 * sets it before the entry, as KVM_INTERRUPT would have. Only when no event is in
 * flight (the caller checked ready_for_interrupt_injection: no exception, interrupt or
 * NMI is being reinjected), so the snapshot written back is the vCPU's own state. On
 * the KVM_INTERRUPT path: returns -1 with errno in v->err if it failed. Owner-only.
 */
static int queue_by_ioctl(struct vcpu *v, int vector)
{
	struct kvm_interrupt irq = {.irq = (uint32_t)vector};
	if (v->fd >= 0 && ioctl(v->fd, KVM_INTERRUPT, &irq) < 0) {
		v->err = errno;
		return -1;
	}
	v->stats[S_INJECT_IOCTL]++;
	return 0;
}

int kvm_queue_interrupt(struct vcpu *v, int vector)
{
	struct kvm_run *kr = v->run;
	struct kvm_vcpu_events *ev = &kr->s.regs.events;
	if (!v->events_fresh || ev->exception.injected || ev->exception.pending ||
	    ev->interrupt.injected || ev->nmi.injected)
		return queue_by_ioctl(v, vector);
	ev->interrupt.injected = 1;
	ev->interrupt.nr = (uint8_t)vector;
	ev->interrupt.soft = 0;
	kr->kvm_dirty_regs |= KVM_SYNC_X86_EVENTS;
	v->stats[S_INJECT_SYNC]++;
	return 0;
}

/*
 * Python is about to make a vCPU ioctl (kvmpy/kvm/system.py VcpuFd): the snapshot may
 * no longer be the vCPU's state, and an interrupt queued in it must reach KVM first,
 * by KVM_INTERRUPT, so that the ioctl sees it as it would have. Owner-only (vCPU
 * ioctls are made on the vCPU's thread, or while it does not run).
 */
int kvm_vcpu_events_changed(struct vcpu *v)
{
	struct kvm_run *kr = v->run;
	v->events_fresh = false;
	if (!(kr->kvm_dirty_regs & KVM_SYNC_X86_EVENTS))
		return 0;
	kr->kvm_dirty_regs &= ~(uint64_t)KVM_SYNC_X86_EVENTS;
	v->stats[S_INJECT_SYNC]--; /* it goes by the ioctl after all */
	return queue_by_ioctl(v, kr->s.regs.events.interrupt.nr);
}

/* KVM's inject_pending_event for the APIC's maskable interrupts (vcpu.py
 * _inject_pending_events): inject the highest deliverable IRR vector, or ask KVM for
 * an interrupt window. Returns false if KVM_INTERRUPT failed (errno in v->err). */
bool inject_pending_irq(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	if (extint(v)) { /* not injectable now, or the loop top had handed it over */
		run->request_interrupt_window = 1;
		return true;
	}
	int vector = lapic_pending_vector(v);
	if (vector < 0) {
		run->request_interrupt_window = 0;
		return true;
	}
	if (run->ready_for_interrupt_injection && run->if_flag) {
		lapic_ack(v, vector);
		trace_rec(v, TR_INJECT, vector, 0); /* before the ioctl, as Python's */
		if (kvm_queue_interrupt(v, vector) < 0)
			return false;
		/* KVM holds one queued interrupt without an in-kernel irqchip: until it
		 * rewrites this flag at the next exit, ask for a window instead. */
		run->ready_for_interrupt_injection = 0;
		run->request_interrupt_window = 0;
	} else {
		run->request_interrupt_window = 1;
	}
	return true;
}

/* MOV to CR8 by the guest (64-bit mode): TPR follows (SDM 10.8.6.1). False if CR8
 * holds reserved bits (Python raises the #GP). */
bool sync_cr8(struct vcpu *v)
{
	uint64_t cr8 = v->run->cr8;
	if (cr8 == v->apic.r[R_CR8])
		return true;
	if (cr8 & ~0xFull)
		return false;
	v->apic.r[R_CR8] = (uint32_t)cr8;
	v->apic.r[R_TPR] = (uint32_t)cr8 << 4;
	lapic_update_ppr(v);
	return true;
}

/* KVM_RUN, then the exit read once from kvm_run into the loop's own fields. */
static int run(struct vcpu *v, struct exit *exit)
{
	struct kvm_run *kr = v->run;
	uint64_t t_enter = v->trace ? now_ns() : 0;
	/* KVM stores the events into kvm_run.s.regs at every return (store_regs). */
	kr->kvm_valid_regs = v->vm->sync_events ? KVM_SYNC_X86_EVENTS : 0;
	int ret = ioctl(v->fd, KVM_RUN, 0);
	int err = errno;
	exit->t_exit_ns = now_ns();
	/* Set by sync_regs, or refused with the KVM_RUN (EINVAL): either way no longer ours. */
	kr->kvm_dirty_regs = 0;
	v->events_fresh = v->vm->sync_events && (ret == 0 || err == EINTR || err == EAGAIN);
	/* seq_cst: the kick protocol; a sender that reads OUTSIDE_GUEST from here on
	 * leaves the request to the loop top. */
	atomic_store_explicit(&v->mode, OUTSIDE_GUEST, memory_order_seq_cst);
	if (ret < 0) {
		if (err == EINTR || err == EAGAIN) {
			/* A kick: EINTR is an ordinary exit. relaxed: only KVM reads it, at entry. */
			atomic_store_explicit((_Atomic uint8_t *)&kr->immediate_exit, 0,
					      memory_order_relaxed);
			exit->reason = KVM_EXIT_INTR;
			exit->a = exit->b = exit->c = 0;
			trace_rec(v, TR_RUN, KVM_EXIT_INTR, (int64_t)t_enter);
			return 0;
		}
		v->err = err;
		return -1;
	}
	uint32_t reason = kr->exit_reason;
	exit->reason = reason;
	switch (reason) {
	case KVM_EXIT_X86_RDMSR:
	case KVM_EXIT_X86_WRMSR:
		exit->a = kr->msr.index;
		exit->b = kr->msr.data;
		exit->c = kr->msr.reason;
		break;
	case KVM_EXIT_MMIO:
		exit->a = kr->mmio.phys_addr;
		exit->b = kr->mmio.len;
		exit->c = kr->mmio.is_write;
		break;
	case KVM_EXIT_IO:
		exit->a = kr->io.port;
		exit->b = kr->io.size;
		exit->c = kr->io.direction;
		break;
	default:
		exit->a = exit->b = exit->c = 0;
	}
	/* one RUN record per KVM_RUN: a = reason | detail << 8, b = entry time */
	trace_rec(v, TR_RUN, (int64_t)(reason | exit->a << 8), (int64_t)t_enter);
	return 0;
}

static enum fastpath handle_fastpath_wrmsr(struct vcpu *v, const struct exit *exit)
{
	uint64_t value = exit->b;
	switch (exit->a) {
	case MSR_TSC_DEADLINE: /* upstream's handle_fastpath_set_tscdeadline */
		return lapic_tsc_deadline_fast(v, value, exit->t_exit_ns);
	case MSR_X2APIC_ICR:
		return lapic_x2apic_icr_write_fast(v, value);
	case MSR_X2APIC_SELF_IPI:
		return lapic_self_ipi_fast(v, value);
	case MSR_X2APIC_EOI:
		/* A nonzero write #GPs (SDM 10.12.1.2): Python injects it. */
		if (value || v->apic.r[R_MODE] != APIC_X2APIC)
			return FASTPATH_NONE;
		return lapic_eoi_fast(v);
	}
	return FASTPATH_NONE;
}

static enum fastpath handle_fastpath_mmio(struct vcpu *v, const struct exit *exit)
{
	struct lapic *a = &v->apic;
	if (!exit->c || exit->b != 4 || a->r[R_MODE] != APIC_XAPIC)
		return FASTPATH_NONE;
	uint64_t offset = exit->a - a->q[Q_BASE_ADDRESS];
	if (offset == XAPIC_EOI)
		return lapic_eoi_fast(v);
	if (offset == XAPIC_ICR_LOW) {
		uint32_t value;
		__builtin_memcpy(&value, v->run->mmio.data, 4);
		return lapic_icr_write_fast(v, value & XAPIC_ICR_LOW_WRITABLE, a->r[R_ICR_DEST] & 0xFF);
	}
	return FASTPATH_NONE;
}

/*
 * The seed's fastpath (vmx_handle_exit_irqoff -> handle_fastpath_set_msr_irqoff):
 * right after the exit, before the GIL. Returns upstream's fastpath_t, never a fake
 * exit reason. A kick's EINTR re-enters in every setting but --fastpath python, which
 * hands every exit to Python's handle_exit_irqoff.
 */
enum fastpath handle_exit_irqoff(struct vcpu *v, struct exit *exit)
{
	/* relaxed: the setting is chosen before the vCPUs run (tracing may change it). */
	int setting = atomic_load_explicit(&v->vm->setting, memory_order_relaxed);
	if (setting == SETTING_PYTHON)
		return FASTPATH_NONE;
	switch (exit->reason) {
	case KVM_EXIT_INTR:
		return FASTPATH_REENTER_GUEST; /* the loop top picks up the kick's request */
	case KVM_EXIT_IRQ_WINDOW_OPEN:
		/* The window the loop top asked for: it injects there (Python's
		 * handle_nothing). An ExtINT or NMI behind it goes to Python from there too. */
		return setting == SETTING_NATIVE ? FASTPATH_REENTER_GUEST : FASTPATH_NONE;
	case KVM_EXIT_X86_WRMSR:
		return setting == SETTING_NATIVE ? handle_fastpath_wrmsr(v, exit) : FASTPATH_NONE;
	case KVM_EXIT_MMIO:
		return setting == SETTING_NATIVE ? handle_fastpath_mmio(v, exit) : FASTPATH_NONE;
	case KVM_EXIT_HLT:
		/* handle_fastpath_hlt: KVM has stepped past the HLT. A wake-up already
		 * pending ends it; else the vCPU halts (EXIT_HANDLED). */
		if (setting != SETTING_NATIVE)
			return FASTPATH_NONE;
		if (lapic_halt_ends_at_once(v, v->run->if_flag))
			return FASTPATH_REENTER_GUEST;
		return FASTPATH_EXIT_HANDLED;
	}
	return FASTPATH_NONE;
}

/*
 * kvm_vcpu_halt's window update (virt/kvm/kvm_main.c) after a halt of `halt_ns` that
 * slept, with KVM's module parameters (grow 2, grow_start 10 us, shrink 2): unchanged
 * if the halt ended inside the window; shrunk (grow_start or less: off) after a halt
 * longer than the maximum; grown (at least grow_start, at most the maximum) after a
 * short halt that outlasted the window; with no maximum, off. The one implementation:
 * Python's halts (vcpu.py _block_until_runnable) call it through Core.adapt_halt_poll.
 * Owner-only, as v->halt_poll_ns.
 */
void adapt_halt_poll(struct vcpu *v, uint64_t halt_ns)
{
	uint64_t poll = v->halt_poll_ns, max = v->vm->halt_poll_max_ns;
	if (!max) {
		v->halt_poll_ns = 0;
	} else if (halt_ns <= poll) {
		/* woke inside the window: KVM leaves it */
	} else if (poll && halt_ns > max) {
		poll /= HALT_POLL_SHRINK; /* shrink_halt_poll_ns */
		v->halt_poll_ns = poll < HALT_POLL_GROW_START_NS ? 0 : poll;
	} else if (poll < max && halt_ns < max) {
		poll = poll * HALT_POLL_GROW; /* grow_halt_poll_ns */
		if (poll < HALT_POLL_GROW_START_NS)
			poll = HALT_POLL_GROW_START_NS;
		v->halt_poll_ns = poll < max ? poll : max;
	}
}

/* The HLT's wake-up test while halted: a maskable interrupt (IF was 1), an event only
 * Python handles, the timer, or a stop. */
static bool halt_over(struct vcpu *v)
{
	/* seq_cst: after the caller's seq_cst clear of `request` or `wake`, a stop whose
	 * kick that clear erased is seen here (Core_stop stores `stopping` first). */
	return lapic_halt_ends_at_once(v, true) || timer_due(v) ||
	       atomic_load_explicit(&v->vm->stopping, memory_order_seq_cst);
}

/*
 * kvm_vcpu_halt for a HLT with IF=1: poll for up to halt_poll_ns (adaptive), then
 * block on the wake token, without the GIL. Returns when the halt is over: an
 * interrupt to inject (the loop goes on), or something for Python (the loop top hands
 * it over). A HLT with IF=0 is Python's (only NMI/INIT/SMI end it).
 */
bool vcpu_halt_in_core(struct vcpu *v, bool if_flag)
{
	struct vm *vm = v->vm;
	if (!if_flag)
		return false;
	uint64_t start = now_ns(), poll_ns = v->halt_poll_ns;
	send_posted_kicks(v);
	if (poll_ns && kvm_vcpu_may_poll(v)) {
		uint64_t end = start + poll_ns, deadline = v->apic.q[Q_TIMER_DEADLINE];
		if (deadline && deadline < end)
			end = deadline; /* the timer is the sleeper's business */
		/* seq_cst: as IN_GUEST; a sender that reads POLLING does nothing more. */
		atomic_store_explicit(&v->mode, POLLING, memory_order_seq_cst);
		trace_rec(v, TR_BLOCK, 1, 0);
		for (;;) {
			/* seq_cst: clear, then re-check, then watch. */
			atomic_store_explicit(&v->request, 0, memory_order_seq_cst);
			if (halt_over(v)) {
				atomic_store_explicit(&v->mode, OUTSIDE_GUEST, memory_order_seq_cst);
				v->stats[S_HALT_POLL_OK]++;
				trace_rec(v, TR_UNBLOCK, 1, 0);
				return true;
			}
			if (!kvm_vcpu_poll(v, end))
				break;
		}
		atomic_store_explicit(&v->mode, OUTSIDE_GUEST, memory_order_seq_cst);
	}
	/* seq_cst: a sender that reads BLOCKED leaves a token and wakes the futex. */
	atomic_store_explicit(&v->mode, BLOCKED, memory_order_seq_cst);
	atomic_fetch_sub_explicit(&vm->busy, 1, memory_order_relaxed);
	if (!poll_ns || !v->trace_count || v->trace[((v->trace_count - 1) % v->trace_cap) * 4 + 1]
	    != TR_BLOCK)
		trace_rec(v, TR_BLOCK, 1, 0); /* unless the poll's BLOCK stands */
	for (;;) {
		/* seq_cst: drop a stale token, then re-check: a token left after this store
		 * is seen by the futex wait (its value is no longer 0). */
		atomic_store_explicit(&v->wake, 0, memory_order_seq_cst);
		if (halt_over(v))
			break;
		uint64_t deadline = v->apic.q[Q_TIMER_DEADLINE];
		int64_t timeout = -1;
		if (deadline) {
			uint64_t now = now_ns();
			timeout = deadline > now ? (int64_t)(deadline - now) : 0;
		}
		bool woken = kvm_vcpu_block_wait(v, timeout);
		trace_rec(v, TR_WOKE, woken, 0);
	}
	atomic_fetch_add_explicit(&vm->busy, 1, memory_order_relaxed);
	atomic_store_explicit(&v->mode, OUTSIDE_GUEST, memory_order_seq_cst);
	trace_rec(v, TR_UNBLOCK, 1, 0);
	v->stats[S_HALT_SLEPT]++;
	adapt_halt_poll(v, now_ns() - start);
	return true;
}

static void account(struct vcpu *v, const struct exit *exit)
{
	enum fastpath fp = exit->fp;
	uint32_t reason = exit->reason < MAX_REASON ? exit->reason : MAX_REASON - 1;
	uint64_t *s = v->stats;
	s[S_COUNT + reason]++;
	if (fp != FASTPATH_REENTER_GUEST)
		return;
	s[S_FAST + reason]++;
	bool icr = (exit->reason == KVM_EXIT_X86_WRMSR &&
		    (exit->a == MSR_X2APIC_ICR || exit->a == MSR_X2APIC_SELF_IPI)) ||
		   (exit->reason == KVM_EXIT_MMIO &&
		    exit->a - v->apic.q[Q_BASE_ADDRESS] == XAPIC_ICR_LOW);
	if (icr)
		s[S_ICR_FAST]++;
	if (s[S_RECORD_TIME]) {
		uint64_t dt = now_ns() - exit->t_exit_ns;
		s[S_FAST_TOTAL + reason] += dt;
		hist_add(&s[S_HIST + reason * NBUCKETS], dt);
		if (icr)
			hist_add(&s[S_ICR_HIST], dt);
	}
}

/*
 * vcpu_enter_guest, looped: returns to Python only with an exit the fastpath did not
 * complete (RET_EXIT, the verdict in *fp), events only Python injects (RET_EVENTS),
 * a stop, or an error. Called with the GIL released. `timer_expired`: Python expired
 * the APIC timer since the previous call.
 */
enum core_ret vcpu_enter_guest(struct vcpu *v, struct exit *exit, bool timer_expired)
{
	struct vm *vm = v->vm;
	struct kvm_run *kr = v->run;
	/* Python expired the timer before this call: hand a newly due one back only after
	 * one entry, so that a periodic timer shorter than the round trip cannot keep the
	 * vCPU out of the guest (a 1 ns period with --min-timer-period-us 0;
	 * guest/timer_storm.c). Any other due timer goes back at once: it fell due after
	 * Python looked, and its kick may have come before the clear of `request` below;
	 * entered with it, a guest that makes no exit would never get its interrupt. */
	bool entered = !timer_expired;
	for (;;) {
		if (atomic_load_explicit(&vm->stopping, memory_order_acquire))
			return RET_STOP;
		/* A kick that came while this vCPU was out of KVM_RUN: its request is picked
		 * up below, and a set immediate_exit would only cost an empty KVM_RUN. */
		atomic_store_explicit((_Atomic uint8_t *)&kr->immediate_exit, 0,
				      memory_order_relaxed);
		/* seq_cst: cleared before the events are read (a later request is seen). */
		atomic_store_explicit(&v->request, 0, memory_order_seq_cst);
		if (slow_events(v) || (entered && timer_due(v)) || !sync_cr8(v) ||
		    (extint(v) && kr->ready_for_interrupt_injection && kr->if_flag))
			return RET_EVENTS;
		if (!inject_pending_irq(v))
			return RET_ERROR;
		/* Publish IN_GUEST, then re-check requests (the kick protocol). */
		atomic_store_explicit(&v->mode, IN_GUEST, memory_order_seq_cst);
		if (atomic_load_explicit(&v->request, memory_order_seq_cst) ||
		    atomic_load_explicit(&vm->stopping, memory_order_seq_cst)) {
			atomic_store_explicit(&v->mode, OUTSIDE_GUEST, memory_order_seq_cst);
			continue;
		}
		send_posted_kicks(v);
		if (run(v, exit) < 0)
			return RET_ERROR;
		entered = true;
		enum fastpath fp = handle_exit_irqoff(v, exit);
		exit->fp = fp;
		account(v, exit);
		if (fp == FASTPATH_REENTER_GUEST) {
			trace_rec(v, TR_DONE, exit->reason, 1);
			continue;
		}
		if (fp == FASTPATH_EXIT_HANDLED && exit->reason == KVM_EXIT_HLT &&
		    vcpu_halt_in_core(v, kr->if_flag))
			continue;
		v->stats[S_HANDED_OVER]++;
		return RET_EXIT;
	}
}
