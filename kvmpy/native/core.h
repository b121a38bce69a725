/*
 * kvmpy's native exit core: shared definitions.
 *
 * The core runs a vCPU's loop (KVM's vcpu_enter_guest) with the GIL released: inject
 * the pending interrupt, KVM_RUN, read the exit, handle_exit_irqoff (the seed's
 * fastpath), halt polling and blocking, and the kick. Everything else returns to
 * Python, which handles it under the GIL (kvmpy/exits.py handle_exit).
 *
 * Memory shared with Python. The local APIC's state has one home: LocalApic's
 * bytearrays (IRR, ISR, TMR, one byte per vector) and its register words (`regs`,
 * indexes R_* below, mirrored in kvmpy/native/layout.py). The core holds buffer
 * views of them; Python reads and writes them through memoryviews. There is no
 * second copy. Bytes and words other threads write (IRR, TMR, SLOW_EVENTS) are
 * accessed with C11 atomics here; the memory order is stated at each access.
 */
#ifndef KVMPY_CORE_H
#define KVMPY_CORE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <linux/kvm.h>

/* ---- register words (uint32 index into LocalApic.regs) ---- */
enum {
	R_TPR = 0,
	R_PPR = 1,
	R_MODE = 2,        /* ApicMode: 0 disabled, 1 xAPIC, 2 x2APIC */
	R_SW_ENABLED = 3,  /* SVR bit 8 */
	R_APIC_ID = 4,     /* x2APIC ID (== initial APIC ID) */
	R_XAPIC_ID = 5,    /* 8-bit xAPIC ID (software-writable) */
	R_LDR = 6,         /* xAPIC LDR register */
	R_DFR = 7,
	R_X2APIC_LDR = 8,
	R_SVR = 9,
	R_ICR_LOW = 10,
	R_ICR_DEST = 11,
	R_SLOW_EVENTS = 12, /* nonzero: NMI/INIT/SIPI/SMI published; Python must look */
	R_CR8 = 13,         /* kvm_run.cr8 as last synced with TPR */
	R_EXTINT = 14,      /* nonzero: the 8259's INTR is up and LINT0 takes it (ExtINT);
			     * Python keeps it (LocalApic.set_extint_line) and injects it */
	R_TIMER_MODE = 15,  /* ApicTimer.mode: LVT timer bits 18:17 as the timer runs them */
	R_NWORDS = 16,
};
/* ---- uint64 index into the same buffer ---- */
enum {
	Q_BASE_ADDRESS = 8,  /* xAPIC MMIO base */
	Q_IPI_SENT = 9,      /* counters bumped by the core (Python adds its own) */
	Q_IPI_NO_TARGET = 10,
	Q_RX_FIXED = 11,
	Q_RX_REJECTED = 12,
	Q_INJECTED = 13,
	Q_EOI = 14,
	Q_SELF_IPI = 15,
	Q_TIMER_DEADLINE = 16, /* the APIC timer's next expiry (ApicTimer.deadline_ns),
				* CLOCK_MONOTONIC ns; 0: none */
	Q_TSC_DEADLINE = 17,   /* IA32_TSC_DEADLINE as armed (ApicTimer.tsc_deadline) */
	/* The guest TSC as Python computes it (LocalApic.tsc_at): Q_TSC_REF at
	 * CLOCK_MONOTONIC Q_TSC_REF_NS, Q_TSC_HZ ticks a second; Q_TSC_HZ 0: not published */
	Q_TSC_HZ = 18,
	Q_TSC_REF = 19,
	Q_TSC_REF_NS = 20,
	Q_NWORDS = 21,
};
#define REGS_BYTES (Q_NWORDS * 8)

enum apic_mode { APIC_DISABLED = 0, APIC_XAPIC = 1, APIC_X2APIC = 2 };
#define TIMER_TSC_DEADLINE 2 /* R_TIMER_MODE (SDM 10.5.1) */

/* ---- per-vCPU statistics (uint64 index into the stats buffer; kvmpy/native/layout.py) */
#define MAX_REASON 64
#define NBUCKETS 512 /* kvmpy/trace.py: 64 powers of two x 8 sub-buckets */
enum {
	S_COUNT = 0,                       /* [MAX_REASON] exits seen by the core */
	S_FAST = S_COUNT + MAX_REASON,     /* [MAX_REASON] completed by the native fastpath */
	S_FAST_TOTAL = S_FAST + MAX_REASON, /* [MAX_REASON] ns of handling, fastpath */
	S_ICR_FAST = S_FAST_TOTAL + MAX_REASON,
	S_HALT_POLL_OK,
	S_HALT_SLEPT,
	S_KICK_SIGNALS,
	S_KICK_WAKES,
	S_HANDED_OVER,     /* exits returned to Python */
	S_RECORD_TIME,     /* Python sets it: nonzero = time the exits */
	S_INJECT_SYNC,     /* interrupts queued in kvm_run.s.regs (set by KVM_RUN) */
	S_INJECT_IOCTL,    /* interrupts queued by the KVM_INTERRUPT ioctl */
	S_HIST = 256,                                  /* [MAX_REASON][NBUCKETS] fast_time */
	S_ICR_HIST = S_HIST + MAX_REASON * NBUCKETS,   /* [NBUCKETS] */
	S_KICK_HIST = S_ICR_HIST + NBUCKETS,
	S_WAKE_HIST = S_KICK_HIST + NBUCKETS,
	S_NWORDS = S_WAKE_HIST + NBUCKETS,
};

/* KVM's vcpu->mode, as the kick protocol sees it (kvmpy/vcpu.py VcpuMode). */
enum vcpu_mode { OUTSIDE_GUEST = 0, IN_GUEST = 1, BLOCKED = 2, POLLING = 3 };

/* upstream's fastpath_t */
enum fastpath { FASTPATH_NONE = 0, FASTPATH_REENTER_GUEST = 1, FASTPATH_EXIT_HANDLED = 2 };

/* Which fastpath the loop runs (kvmpy --fastpath). */
enum fastpath_setting { SETTING_OFF = 0, SETTING_PYTHON = 1, SETTING_NATIVE = 2 };

/* Why vcpu_enter_guest returned to Python. */
enum core_ret {
	RET_EXIT = 0,    /* an exit for Python's handle_exit (with the fastpath's verdict) */
	RET_EVENTS = 1,  /* events only Python injects (NMI/INIT/SIPI/SMI, a CR8 #GP) */
	RET_STOP = 2,    /* the VM is stopping */
	RET_ERROR = 3,   /* KVM_RUN or KVM_INTERRUPT failed: errno in err */
};

#define MAX_VCPUS 1024
#define KICK_WORDS (MAX_VCPUS / 64)

struct lapic {
	uint8_t *irr, *isr, *tmr; /* 256 bytes each, LocalApic's bytearrays */
	uint32_t *r;              /* register words */
	uint64_t *q;              /* the same buffer as uint64 */
};

struct vm;

struct vcpu {
	struct vm *vm;
	int index;
	int fd;                   /* KVM vCPU fd, -1 for a model-only vCPU (tests) */
	struct kvm_run *run;
	struct lapic apic;
	uint64_t *stats;          /* S_* */
	/* The kick protocol's state (DESIGN.md "Delivering an interrupt"). */
	_Atomic int mode;         /* enum vcpu_mode */
	_Atomic int request;      /* KVM_REQ_EVENT */
	_Atomic uint32_t wake;    /* futex word: 1 = a wake token is there */
	_Atomic unsigned long thread; /* pthread_t of the vCPU thread, 0 before it runs */
	/* Kicks this vCPU's exit handling posted; sent before its next entry or sleep.
	 * Owner-only (the poster is the vCPU thread itself). */
	uint64_t posted_signal[KICK_WORDS];
	uint64_t posted_wake[KICK_WORDS];
	bool posted;
	/* Halt polling (KVM's vcpu->halt_poll_ns). Owner-only. */
	uint64_t halt_poll_ns;
	int err;                  /* errno of a failed KVM_RUN / KVM_INTERRUPT */
	/* KVM_CAP_SYNC_REGS (kvm_queue_interrupt): kvm_run.s.regs.events holds the events
	 * KVM stored at the last exit, and nothing has changed them since (Python's vCPU
	 * ioctls call Core.events_changed first). Owner-only. */
	bool events_fresh;
	int timerfd;              /* timer.c: kicks this vCPU at a deadline the core armed */
	_Atomic uint64_t timer_armed_ns; /* that deadline, for the timer thread's trace */
	/* --trace: this vCPU's native ring (kvmpy/tracing/recorder.py's records, four
	 * int64 each), written only by this vCPU's thread; NULL when not tracing. */
	int64_t *trace;
	uint64_t trace_cap;       /* records */
	uint64_t trace_count;     /* records ever written (owner; read after the VM stops) */
};

/* What run() returns: the exit, read once from kvm_run (kvmpy/vcpu.py Exit). It lives
 * on the stack of the loop's caller, never in the vCPU (the seed: nothing vCPU-wide
 * stores the exit reason). a, b, c: msr index, data, reason / MMIO gpa, len, is_write /
 * port, size, direction. */
struct exit {
	uint32_t reason;
	uint64_t a, b, c;
	uint64_t t_exit_ns;       /* when KVM_RUN returned (CLOCK_MONOTONIC) */
	enum fastpath fp;         /* handle_exit_irqoff's verdict */
};

struct vm {
	int nvcpus;
	struct vcpu **vcpus;
	_Atomic int stopping;
	_Atomic int busy;          /* vCPU threads not blocked (KVM: single_task_running) */
	int host_cpus;
	uint64_t halt_poll_max_ns;
	_Atomic int setting;       /* enum fastpath_setting */
	_Atomic int renumbered;    /* an APIC ID may not be its index (bus.py): a fixed
				    * physical IPI goes to every APIC with the ID (a scan) */
	bool sync_events;          /* KVM_CAP_SYNC_REGS has KVM_SYNC_X86_EVENTS: inject by it */
	/* timer.c: the thread that kicks vCPUs at the deadlines the core armed */
	int timer_epfd, timer_stopfd;
	pthread_t timer_thread;
	bool timer_running;
	/* --trace: the timer thread's ring (TIMER_FIRE and KICK records, four int64 each),
	 * written only by that thread; published with release by Core.timer_trace_attach. */
	_Atomic(int64_t *) timer_trace;
	uint64_t timer_trace_cap;
	_Atomic uint64_t timer_trace_count;
};

/* Trace record kinds, SEND flags and KICK hows: kvmpy/tracing/recorder.py's. */
enum { TR_DONE = 3, TR_INJECT = 4, TR_TIMER_FIRE = 12, TR_EOI = 5, TR_BLOCK = 7, TR_WOKE = 8, TR_UNBLOCK = 9,
       TR_SEND = 10, TR_KICK = 11, TR_RUN = 14 };
enum { SEND_COALESCED = 1, SEND_REJECTED = 2 };
enum { KICK_HOW_NONE = 0, KICK_HOW_SIGNAL = 1, KICK_HOW_WAKE = 2, KICK_HOW_SELF = 3 };

uint64_t now_ns(void);

/* One trace record in this vCPU's ring (owner thread only; wraps over the oldest). */
static inline void trace_rec(struct vcpu *v, int64_t kind, int64_t a, int64_t b)
{
	if (!v->trace)
		return;
	int64_t *r = &v->trace[(v->trace_count % v->trace_cap) * 4];
	r[0] = (int64_t)now_ns();
	r[1] = kind;
	r[2] = a;
	r[3] = b;
	v->trace_count++;
}

static inline bool v_record_time(const struct vcpu *v)
{
	return v->stats[S_RECORD_TIME] != 0;
}

/* lapic_fast.c: the register-file operations the fastpath needs (SDM ch. 10). */
int lapic_highest(const uint8_t *vectors);
int lapic_pending_vector(struct vcpu *v);
void lapic_update_ppr(struct vcpu *v);
void lapic_ack(struct vcpu *v, int vector);
bool lapic_irr_test_and_set(struct lapic *a, int vector);
bool lapic_halt_ends_at_once(struct vcpu *v, bool if_flag);
enum fastpath lapic_icr_write_fast(struct vcpu *src, uint32_t low, uint32_t dest);
enum fastpath lapic_self_ipi_fast(struct vcpu *v, uint64_t value);
enum fastpath lapic_eoi_fast(struct vcpu *v);
enum fastpath lapic_x2apic_icr_write_fast(struct vcpu *v, uint64_t value);
enum fastpath lapic_tsc_deadline_fast(struct vcpu *v, uint64_t value, uint64_t now);

/* timer.c: the per-VM timer thread (IA32_TSC_DEADLINE writes the fastpath completes). */
int timer_init(struct vm *vm);
int timer_add_vcpu(struct vcpu *v);
int timer_start(struct vm *vm);
void timer_stop(struct vm *vm);
void timer_destroy(struct vm *vm);
void timer_arm(struct vcpu *v, uint64_t deadline_ns);

/* kick.c: the kick protocol, halt polling and blocking. */
int kvm_vcpu_kick(struct vcpu *target, struct vcpu *poster);
void send_posted_kicks(struct vcpu *v);
void kick_signal(struct vcpu *target);
void kick_wake(struct vcpu *target);
void kick_install_signal_handler(void);
bool kvm_vcpu_poll(struct vcpu *v, uint64_t end_ns);
bool kvm_vcpu_block_wait(struct vcpu *v, int64_t timeout_ns);
bool kvm_vcpu_may_poll(struct vcpu *v);
void hist_add(uint64_t *hist, uint64_t ns);

/* vcpu_loop.c: the run loop. */
enum fastpath handle_exit_irqoff(struct vcpu *v, struct exit *exit);
enum core_ret vcpu_enter_guest(struct vcpu *v, struct exit *exit, bool timer_expired);
bool inject_pending_irq(struct vcpu *v);
int kvm_queue_interrupt(struct vcpu *v, int vector);
int kvm_vcpu_events_changed(struct vcpu *v);
bool sync_cr8(struct vcpu *v);
bool vcpu_halt_in_core(struct vcpu *v, bool if_flag);
void adapt_halt_poll(struct vcpu *v, uint64_t halt_ns);

#endif
