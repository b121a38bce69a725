/*
 * The core's timer thread: kicks a vCPU at the APIC timer deadline the fastpath armed
 * (an IA32_TSC_DEADLINE write, lapic_tsc_deadline_fast), without the GIL. KVM arms an
 * hrtimer there (start_sw_tscdeadline) whose apic_timer_fn kicks the vCPU; here each
 * vCPU has a timerfd, one thread per VM waits on them all (epoll), and an expiry is a
 * kvm_vcpu_kick from a non-vCPU thread (poster NULL: signal or futex wake at once).
 *
 * Who arms what: this thread serves the deadlines the core wrote; the deadlines
 * Python writes (every other timer register, and the TSC-deadline writes the core
 * hands over) are armed on Python's TimerService (kvmpy/timers.py, Vcpu.sync_timer).
 * Either may kick for a deadline the other has since replaced: such a kick is stale
 * and harmless, as the vCPU compares now with Q_TIMER_DEADLINE at its loop top and in
 * its halt (vcpu_loop.c timer_due), and Python runs the expiry (apic.timer_expired).
 *
 * Shared state: the timerfds (the kernel orders timerfd_settime against the expiry
 * and its read) and vm->vcpus, set before the thread starts (pthread_create orders
 * it). The epoll data carries the vCPU index and its fd, so the thread reads no vCPU
 * field. Q_TIMER_DEADLINE stays owner-only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "core.h"

#define STOP_ID UINT64_MAX

/* The epoll set and the stop eventfd (Core init). -1 and errno on failure. */
int timer_init(struct vm *vm)
{
	vm->timer_epfd = epoll_create1(EPOLL_CLOEXEC);
	vm->timer_stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (vm->timer_epfd < 0 || vm->timer_stopfd < 0)
		return -1;
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = STOP_ID};
	return epoll_ctl(vm->timer_epfd, EPOLL_CTL_ADD, vm->timer_stopfd, &ev);
}

/* The vCPU's timerfd, in the epoll set (Core attach). -1 and errno on failure. */
int timer_add_vcpu(struct vcpu *v)
{
	int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	if (fd < 0)
		return -1;
	struct epoll_event ev = {.events = EPOLLIN,
				 .data.u64 = (uint64_t)v->index << 32 | (uint32_t)fd};
	if (epoll_ctl(v->vm->timer_epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		int err = errno;
		close(fd);
		errno = err;
		return -1;
	}
	v->timerfd = fd;
	return 0;
}

/* Arm the vCPU's timerfd at `deadline_ns` (CLOCK_MONOTONIC), or disarm it with 0.
 * Owner thread; no allocation, no logging. A deadline already passed fires at once. */
void timer_arm(struct vcpu *v, uint64_t deadline_ns)
{
	if (v->timerfd < 0)
		return;
	/* relaxed: read only for the timer thread's trace record of this firing. */
	atomic_store_explicit(&v->timer_armed_ns, deadline_ns, memory_order_relaxed);
	struct itimerspec its = {
		.it_value = {.tv_sec = (time_t)(deadline_ns / 1000000000u),
			     .tv_nsec = (long)(deadline_ns % 1000000000u)},
	};
	timerfd_settime(v->timerfd, TFD_TIMER_ABSTIME, &its, NULL);
}

/* One record in the timer thread's ring (that thread only; wraps over the oldest). */
static void timer_trace_rec(struct vm *vm, int64_t *ring, int64_t kind, int64_t a, int64_t b)
{
	/* relaxed: this thread is the only writer; Python reads it after timer_stop. */
	uint64_t n = atomic_load_explicit(&vm->timer_trace_count, memory_order_relaxed);
	int64_t *r = &ring[(n % vm->timer_trace_cap) * 4];
	r[0] = (int64_t)now_ns();
	r[1] = kind;
	r[2] = a;
	r[3] = b;
	atomic_store_explicit(&vm->timer_trace_count, n + 1, memory_order_relaxed);
}

/* The firing for vCPU `i`: its kick, and under --trace the records Python's
 * TimerService writes for its own firings (TIMER_FIRE, then the KICK with its how). */
static void timer_fire(struct vm *vm, int i)
{
	struct vcpu *v = vm->vcpus[i];
	/* acquire: pairs with Core.timer_trace_attach's release (ring and capacity). */
	int64_t *ring = atomic_load_explicit(&vm->timer_trace, memory_order_acquire);
	if (ring)
		timer_trace_rec(vm, ring, TR_TIMER_FIRE, i,
				(int64_t)atomic_load_explicit(&v->timer_armed_ns,
							      memory_order_relaxed));
	int mode = kvm_vcpu_kick(v, NULL);
	if (ring)
		timer_trace_rec(vm, ring, TR_KICK, i,
				mode == IN_GUEST ? KICK_HOW_SIGNAL
				: mode == BLOCKED ? KICK_HOW_WAKE : KICK_HOW_NONE);
}

static void *timer_main(void *arg)
{
	struct vm *vm = arg;
	struct epoll_event evs[16];
	for (;;) {
		int n = epoll_wait(vm->timer_epfd, evs, 16, -1);
		if (n < 0 && errno != EINTR)
			return NULL;
		for (int i = 0; i < n; i++) {
			uint64_t id = evs[i].data.u64, expiries;
			if (id == STOP_ID)
				return NULL;
			/* Read to re-arm the level; EAGAIN: re-armed since, nothing due. */
			if (read((int)(uint32_t)id, &expiries, sizeof(expiries)) == sizeof(expiries))
				timer_fire(vm, (int)(id >> 32));
		}
	}
}

/* Start the thread once (the first attach), with every signal blocked in it: the kick
 * signal is for vCPU threads, and Python's handlers run on the main thread. */
int timer_start(struct vm *vm)
{
	if (vm->timer_running)
		return 0;
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	int err = pthread_create(&vm->timer_thread, NULL, timer_main, vm);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err) {
		errno = err;
		return -1;
	}
	pthread_setname_np(vm->timer_thread, "kvmpy-ctimer"); /* tests find it by name */
	vm->timer_running = true;
	return 0;
}

/* Stop and join the thread (Core stop, dealloc; idempotent). It never takes the GIL,
 * so the caller may hold it. */
void timer_stop(struct vm *vm)
{
	if (!vm->timer_running)
		return;
	uint64_t one = 1;
	if (write(vm->timer_stopfd, &one, sizeof(one)) != sizeof(one))
		return; /* cannot happen (a counter far from overflow); leave it running */
	pthread_join(vm->timer_thread, NULL);
	vm->timer_running = false;
}

/* Stop the thread and close every fd (Core dealloc). */
void timer_destroy(struct vm *vm)
{
	timer_stop(vm);
	for (int i = 0; i < vm->nvcpus; i++)
		if (vm->vcpus && vm->vcpus[i] && vm->vcpus[i]->timerfd >= 0)
			close(vm->vcpus[i]->timerfd);
	if (vm->timer_epfd >= 0)
		close(vm->timer_epfd);
	if (vm->timer_stopfd >= 0)
		close(vm->timer_stopfd);
}
