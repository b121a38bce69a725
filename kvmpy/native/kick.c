/*
 * The kick protocol, halt polling and blocking (DESIGN.md "Delivering an interrupt to
 * another vCPU"; KVM's kvm_vcpu_kick, kvm_vcpu_halt, Documentation/virt/kvm/
 * vcpu-requests.rst). kvmpy/kick_model.py models exactly these steps and quotes them.
 *
 * Sender:  publish the event (IRR byte, release) -> request = 1 (seq_cst)
 *          -> read mode (seq_cst) -> IN_GUEST: immediate_exit = 1, signal;
 *          BLOCKED: wake token + futex wake; POLLING or OUTSIDE_GUEST: nothing.
 * Target:  mode = IN_GUEST (seq_cst) -> re-check request (seq_cst) -> KVM_RUN.
 *          Blocking: mode = BLOCKED (seq_cst) -> wake = 0 -> re-check events -> futex.
 * Of "sender reads mode" and "target re-checks request", seq_cst makes at least one
 * see the other's store, so no request is left behind a sleeping or running target.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <linux/futex.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "core.h"

#define KICK_SIGNAL SIGUSR1

uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* kvmpy/trace.py bucket_of: log-linear, 8 sub-buckets per power of two. */
void hist_add(uint64_t *hist, uint64_t ns)
{
	int bl = ns ? 64 - __builtin_clzll(ns) : 0;
	int b = bl <= 3 ? (int)ns : ((bl - 3) << 3) | (int)((ns >> (bl - 4)) & 7);
	if (b >= NBUCKETS)
		b = NBUCKETS - 1;
	hist[b]++;
}

static void noop_handler(int sig)
{
	(void)sig; /* its only job: a kicked thread's KVM_RUN returns EINTR */
}

/* A real handler (SIG_IGN would discard the signal), without SA_RESTART. Python's
 * signal module is not involved: its handler would run Python code on the main
 * thread, under the GIL, for every kick. */
void kick_install_signal_handler(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = noop_handler;
	sigemptyset(&sa.sa_mask);
	sigaction(KICK_SIGNAL, &sa, NULL);
}

/* pthread_kill the target out of KVM_RUN (immediate_exit already written). */
void kick_signal(struct vcpu *t)
{
	/* acquire: the thread id is published (release) before the thread's first entry. */
	unsigned long th = atomic_load_explicit(&t->thread, memory_order_acquire);
	if (!th)
		return;
	uint64_t t0 = v_record_time(t) ? now_ns() : 0;
	pthread_kill((pthread_t)th, KICK_SIGNAL);
	if (t0) {
		hist_add(&t->stats[S_KICK_HIST], now_ns() - t0);
	}
	atomic_fetch_add_explicit((_Atomic uint64_t *)&t->stats[S_KICK_SIGNALS], 1,
				  memory_order_relaxed);
}

/* Leave the blocked target its wake token and wake its futex. */
void kick_wake(struct vcpu *t)
{
	uint64_t t0 = v_record_time(t) ? now_ns() : 0;
	/* release: the token follows the published event (the waiter re-checks anyway). */
	atomic_store_explicit(&t->wake, 1, memory_order_release);
	syscall(SYS_futex, &t->wake, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
	if (t0)
		hist_add(&t->stats[S_WAKE_HIST], now_ns() - t0);
	atomic_fetch_add_explicit((_Atomic uint64_t *)&t->stats[S_KICK_WAKES], 1,
				  memory_order_relaxed);
}

/*
 * kvm_vcpu_kick: make `target` see an event the caller has ALREADY published.
 * Hot: no allocation, no lock, no logging. `poster` is the calling vCPU (its exit
 * handling), or NULL for another thread: a vCPU posts the signal or wake-up and sends
 * it just before its own next KVM_RUN (send_posted_kicks), so the woken thread does
 * not wake into a sender that is still busy with its exit. Returns the mode it read.
 */
int kvm_vcpu_kick(struct vcpu *target, struct vcpu *poster)
{
	/* seq_cst: ordered after the event's publication and before the mode load. */
	atomic_store_explicit(&target->request, 1, memory_order_seq_cst);
	/* seq_cst: pairs with the target's seq_cst mode store + request re-check. */
	int mode = atomic_load_explicit(&target->mode, memory_order_seq_cst);
	if (mode == IN_GUEST) {
		if (target == poster)
			return mode; /* our own exit: the loop top sees the request */
		if (target->run)
			/* relaxed: KVM reads it at entry; the signal covers an entry under way. */
			atomic_store_explicit((_Atomic uint8_t *)&target->run->immediate_exit, 1,
					      memory_order_relaxed);
		if (poster) {
			poster->posted_signal[target->index >> 6] |= 1ull << (target->index & 63);
			poster->posted = true;
		} else {
			kick_signal(target);
		}
	} else if (mode == BLOCKED) {
		if (poster) {
			poster->posted_wake[target->index >> 6] |= 1ull << (target->index & 63);
			poster->posted = true;
		} else {
			kick_wake(target);
		}
	}
	/* POLLING: the poller watches `request`. OUTSIDE_GUEST: its loop top will. */
	return mode;
}

/* Send the kicks this vCPU's exit handling posted (its own thread). A posted kick is
 * late by the rest of the exit, never lost: its event was published first. */
void send_posted_kicks(struct vcpu *v)
{
	struct vm *vm = v->vm;
	if (!v->posted)
		return;
	v->posted = false;
	int words = (vm->nvcpus + 63) / 64;
	for (int w = 0; w < words; w++) {
		uint64_t bits = v->posted_wake[w];
		v->posted_wake[w] = 0;
		while (bits) {
			int i = w * 64 + __builtin_ctzll(bits);
			bits &= bits - 1;
			kick_wake(vm->vcpus[i]);
		}
		bits = v->posted_signal[w];
		v->posted_signal[w] = 0;
		while (bits) {
			int i = w * 64 + __builtin_ctzll(bits);
			bits &= bits - 1;
			struct vcpu *t = vm->vcpus[i];
			/* Left KVM_RUN since (an exit of its own)? Its loop top sees the request,
			 * and a signal would only cost it an empty exit. seq_cst: as the kick. */
			if (atomic_load_explicit(&t->mode, memory_order_seq_cst) == IN_GUEST)
				kick_signal(t);
		}
	}
}

/* The host's runnable tasks (/proc/loadavg's "R/T" field), read at most every 10 ms:
 * other processes' threads compete for the CPUs a poller would spin on. -1 if unknown. */
static int host_runnable(void)
{
	static _Atomic uint64_t read_at;
	static _Atomic int value = -1;
	uint64_t now = now_ns();
	/* relaxed: a cached heuristic; two threads refreshing it at once is harmless. */
	if (now - atomic_load_explicit(&read_at, memory_order_relaxed) < 10000000ull)
		return atomic_load_explicit(&value, memory_order_relaxed);
	atomic_store_explicit(&read_at, now, memory_order_relaxed);
	char buf[128];
	int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	int running = -1;
	if (n > 0) {
		buf[n] = 0;
		float l1, l5, l15;
		if (sscanf(buf, "%f %f %f %d/", &l1, &l5, &l15, &running) != 4)
			running = -1;
	}
	atomic_store_explicit(&value, running, memory_order_relaxed);
	return running;
}

/* KVM polls only while nothing else wants the CPU (single_task_running): here, while
 * the vCPU threads that are not asleep fit on the host's CPUs, and so do all the host's
 * runnable tasks (this poller among them). */
bool kvm_vcpu_may_poll(struct vcpu *v)
{
	struct vm *vm = v->vm;
	/* relaxed: a heuristic, as single_task_running() is. */
	if (atomic_load_explicit(&vm->busy, memory_order_relaxed) > vm->host_cpus)
		return false;
	if (v->fd < 0)
		return true; /* a model-only vCPU (tests): the vCPU count alone */
	return host_runnable() <= vm->host_cpus;
}

/*
 * Spin until a request or `end_ns`, without the GIL (the caller has published
 * mode = POLLING and cleared `request`, then re-checked its events). True if a
 * request came: the caller re-checks and goes on.
 */
bool kvm_vcpu_poll(struct vcpu *v, uint64_t end_ns)
{
	struct vm *vm = v->vm;
	unsigned n = 0;
	/* acquire: a request seen here makes the event published before it visible. */
	while (!atomic_load_explicit(&v->request, memory_order_acquire)) {
		if ((++n & 63) == 0) {
			if (now_ns() >= end_ns ||
			    atomic_load_explicit(&vm->stopping, memory_order_relaxed))
				return false;
		}
		__builtin_ia32_pause();
	}
	return true;
}

/*
 * Sleep on the wake token (futex) until a kick leaves one or `timeout_ns` (< 0: no
 * timeout) passes. The caller has published mode = BLOCKED, cleared the token
 * (kvm_vcpu_block_prepare) and then re-checked its events. True if woken.
 */
bool kvm_vcpu_block_wait(struct vcpu *v, int64_t timeout_ns)
{
	struct timespec ts, *tp = NULL;
	if (timeout_ns >= 0) {
		ts.tv_sec = timeout_ns / 1000000000;
		ts.tv_nsec = timeout_ns % 1000000000;
		tp = &ts;
	}
	/* acquire: pairs with the kicker's release store of the token. */
	if (atomic_load_explicit(&v->wake, memory_order_acquire))
		return true;
	long r = syscall(SYS_futex, &v->wake, FUTEX_WAIT_PRIVATE, 0, tp, NULL, 0);
	(void)r; /* EAGAIN: a token came first; EINTR, ETIMEDOUT: the caller re-checks */
	return atomic_load_explicit(&v->wake, memory_order_acquire) != 0;
}
