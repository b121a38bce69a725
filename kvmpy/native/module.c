/*
 * kvmpy._core: the Python binding of the native exit core (core.h). One Core object
 * per VM, one slot per vCPU; Python attaches each vCPU's fd, kvm_run mapping and its
 * LocalApic's memory (the buffers stay exported, so Python cannot resize them, and
 * both sides read and write the same bytes). Everything here runs with the GIL held
 * except `run`, `poll` and `wait`, which release it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

enum { B_RUN, B_IRR, B_ISR, B_TMR, B_REGS, B_STATS, B_TRACE, NBUF };

struct slot {
	struct vcpu v;
	Py_buffer buf[NBUF];
	bool attached;
	struct kvm_run model_run; /* kvm_run of a model-only vCPU (no fd) */
};

typedef struct {
	PyObject_HEAD
	struct vm vm;
	struct slot *slots;
	Py_buffer timer_trace; /* the timer thread's trace ring (timer_trace_attach) */
} CoreObject;

static struct slot *get_slot(CoreObject *self, int i, bool attached)
{
	if (i < 0 || i >= self->vm.nvcpus) {
		PyErr_Format(PyExc_IndexError, "vCPU index %d out of range", i);
		return NULL;
	}
	if (attached && !self->slots[i].attached) {
		PyErr_Format(PyExc_ValueError, "vCPU %d is not attached", i);
		return NULL;
	}
	return &self->slots[i];
}

static void Core_dealloc(CoreObject *self)
{
	timer_destroy(&self->vm); /* the timer thread first: it kicks the vCPUs */
	if (self->slots) {
		for (int i = 0; i < self->vm.nvcpus; i++)
			for (int b = 0; b < NBUF; b++)
				if (self->slots[i].buf[b].obj)
					PyBuffer_Release(&self->slots[i].buf[b]);
		free(self->slots);
	}
	if (self->timer_trace.obj) /* after timer_destroy: its thread no longer writes */
		PyBuffer_Release(&self->timer_trace);
	free(self->vm.vcpus);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Core_init(CoreObject *self, PyObject *args, PyObject *kwds)
{
	static char *kw[] = {"nvcpus", "host_cpus", "halt_poll_max_ns", "setting", NULL};
	int n, host_cpus, setting = SETTING_NATIVE;
	unsigned long long poll_max = 0;
	self->vm.timer_epfd = self->vm.timer_stopfd = -1; /* before any failure: dealloc */
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii|Ki", kw, &n, &host_cpus, &poll_max,
					 &setting))
		return -1;
	if (n < 1 || n > MAX_VCPUS) {
		PyErr_Format(PyExc_ValueError, "vCPU count %d not in 1..%d", n, MAX_VCPUS);
		return -1;
	}
	if (setting < SETTING_OFF || setting > SETTING_NATIVE) {
		PyErr_SetString(PyExc_ValueError, "bad fastpath setting");
		return -1;
	}
	self->slots = calloc((size_t)n, sizeof(struct slot));
	self->vm.vcpus = calloc((size_t)n, sizeof(struct vcpu *));
	if (!self->slots || !self->vm.vcpus) {
		PyErr_NoMemory();
		return -1;
	}
	self->vm.nvcpus = n;
	self->vm.host_cpus = host_cpus;
	self->vm.halt_poll_max_ns = poll_max;
	atomic_init(&self->vm.setting, setting);
	atomic_init(&self->vm.busy, n);
	for (int i = 0; i < n; i++) {
		struct vcpu *v = &self->slots[i].v;
		v->vm = &self->vm;
		v->index = i;
		v->fd = -1;
		v->timerfd = -1;
		v->halt_poll_ns = 0;
		self->vm.vcpus[i] = v;
	}
	if (timer_init(&self->vm) < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	kick_install_signal_handler();
	return 0;
}

static int get_buf(PyObject *obj, Py_buffer *view, Py_ssize_t min_len, const char *what)
{
	if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
		return -1;
	if (view->len < min_len) {
		PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", what, view->len, min_len);
		PyBuffer_Release(view);
		return -1;
	}
	return 0;
}

/* attach(index, fd, kvm_run, irr, isr, tmr, regs, stats): kvm_run None for a
 * model-only vCPU (tests). */
static PyObject *Core_attach(CoreObject *self, PyObject *args)
{
	int i, fd;
	PyObject *objs[B_TRACE];
	if (!PyArg_ParseTuple(args, "iiOOOOOO", &i, &fd, &objs[B_RUN], &objs[B_IRR], &objs[B_ISR],
			      &objs[B_TMR], &objs[B_REGS], &objs[B_STATS]))
		return NULL;
	struct slot *s = get_slot(self, i, false);
	if (!s)
		return NULL;
	if (s->attached) {
		PyErr_Format(PyExc_ValueError, "vCPU %d is already attached", i);
		return NULL;
	}
	static const char *names[B_TRACE] = {"kvm_run", "irr", "isr", "tmr", "regs", "stats"};
	Py_ssize_t lens[B_TRACE] = {sizeof(struct kvm_run), 256, 256, 256, REGS_BYTES,
				 S_NWORDS * 8};
	for (int b = 0; b < B_TRACE; b++) {
		if (b == B_RUN && objs[b] == Py_None)
			continue;
		if (get_buf(objs[b], &s->buf[b], lens[b], names[b]) < 0) {
			for (int j = 0; j < b; j++)
				if (s->buf[j].obj)
					PyBuffer_Release(&s->buf[j]);
			return NULL;
		}
	}
	struct vcpu *v = &s->v;
	/* The timer thread starts with the first vCPU (the fastpath's TSC deadlines). */
	if ((v->timerfd < 0 && timer_add_vcpu(v) < 0) || timer_start(&self->vm) < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		for (int b = 0; b < B_TRACE; b++)
			if (s->buf[b].obj)
				PyBuffer_Release(&s->buf[b]);
		return NULL;
	}
	v->fd = fd;
	v->run = s->buf[B_RUN].obj ? s->buf[B_RUN].buf : &s->model_run;
	v->apic.irr = s->buf[B_IRR].buf;
	v->apic.isr = s->buf[B_ISR].buf;
	v->apic.tmr = s->buf[B_TMR].buf;
	v->apic.r = s->buf[B_REGS].buf;
	v->apic.q = s->buf[B_REGS].buf;
	v->stats = s->buf[B_STATS].buf;
	s->attached = true;
	Py_RETURN_NONE;
}

/* run(index, timer_expired=False) -> (ret, reason, a, b, c, fastpath, t_exit_ns):
 * vcpu_enter_guest without the GIL; timer_expired: Python expired the APIC timer since
 * the previous call. */
static PyObject *Core_run(CoreObject *self, PyObject *args)
{
	int i, timer_expired = 0;
	if (!PyArg_ParseTuple(args, "i|p", &i, &timer_expired))
		return NULL;
	struct slot *s = get_slot(self, i, true);
	if (!s)
		return NULL;
	struct vcpu *v = &s->v;
	if (v->fd < 0) {
		PyErr_SetString(PyExc_ValueError, "a model-only vCPU cannot run");
		return NULL;
	}
	/* release: the thread id is visible to kickers before this thread enters. */
	atomic_store_explicit(&v->thread, (unsigned long)pthread_self(), memory_order_release);
	enum core_ret ret;
	struct exit exit = {0};
	Py_BEGIN_ALLOW_THREADS
	ret = vcpu_enter_guest(v, &exit, timer_expired);
	Py_END_ALLOW_THREADS
	if (ret == RET_ERROR) {
		errno = v->err;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	return Py_BuildValue("iIKKKiK", (int)ret, exit.reason, (unsigned long long)exit.a,
			     (unsigned long long)exit.b, (unsigned long long)exit.c,
			     ret == RET_EXIT ? (int)exit.fp : 0, (unsigned long long)exit.t_exit_ns);
}

static int parse_slot(CoreObject *self, PyObject *args, struct vcpu **v, bool attached)
{
	int i;
	if (!PyArg_ParseTuple(args, "i", &i))
		return -1;
	struct slot *s = get_slot(self, i, attached);
	if (!s)
		return -1;
	*v = &s->v;
	return 0;
}

static int parse_index(CoreObject *self, PyObject *args, struct vcpu **v)
{
	return parse_slot(self, args, v, false);
}

/* A wake-up or a sleep touches the vCPU's stats: only an attached vCPU has them. */
static int parse_attached(CoreObject *self, PyObject *args, struct vcpu **v)
{
	return parse_slot(self, args, v, true);
}

/* kick(target, poster): poster -1 when the caller is not a vCPU thread. */
static PyObject *Core_kick(CoreObject *self, PyObject *args)
{
	int t, p;
	if (!PyArg_ParseTuple(args, "ii", &t, &p))
		return NULL;
	struct slot *ts = get_slot(self, t, false);
	if (!ts)
		return NULL;
	struct slot *ps = p >= 0 ? get_slot(self, p, false) : NULL;
	if (p >= 0 && !ps)
		return NULL;
	kvm_vcpu_kick(&ts->v, ps ? &ps->v : NULL);
	Py_RETURN_NONE;
}

static PyObject *Core_send_posted_kicks(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_index(self, args, &v) < 0)
		return NULL;
	send_posted_kicks(v);
	Py_RETURN_NONE;
}

/* stop(): every vCPU leaves the core: the stop flag, then a kick of each; then the
 * timer thread stops (joined: it never takes the GIL). */
static PyObject *Core_stop(CoreObject *self, PyObject *noargs)
{
	/* seq_cst: before the kicks' request stores; loops re-check it after IN_GUEST. */
	atomic_store_explicit(&self->vm.stopping, 1, memory_order_seq_cst);
	for (int i = 0; i < self->vm.nvcpus; i++) {
		struct vcpu *v = &self->slots[i].v;
		kvm_vcpu_kick(v, NULL);
		if (self->slots[i].attached) /* no stats, and nobody asleep, otherwise */
			kick_wake(v); /* a sleeper in any mode (Python's sleep too) */
	}
	timer_stop(&self->vm);
	Py_RETURN_NONE;
}

/* Python's halt and wait-for-SIPI sleep (vcpu.py _sleep_until_runnable) on the same
 * token: sleep_begin, then per pass wake_clear, re-check, wait; sleep_end. */
static PyObject *Core_sleep_begin(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_attached(self, args, &v) < 0)
		return NULL;
	send_posted_kicks(v);
	/* seq_cst: a sender that reads BLOCKED leaves a token. */
	atomic_store_explicit(&v->mode, BLOCKED, memory_order_seq_cst);
	atomic_fetch_sub_explicit(&v->vm->busy, 1, memory_order_relaxed);
	Py_RETURN_NONE;
}

static PyObject *Core_sleep_end(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_index(self, args, &v) < 0)
		return NULL;
	atomic_fetch_add_explicit(&v->vm->busy, 1, memory_order_relaxed);
	atomic_store_explicit(&v->mode, OUTSIDE_GUEST, memory_order_seq_cst);
	Py_RETURN_NONE;
}

static PyObject *Core_wake_clear(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_index(self, args, &v) < 0)
		return NULL;
	/* seq_cst: drop a stale token before the caller re-checks its events. */
	atomic_store_explicit(&v->wake, 0, memory_order_seq_cst);
	Py_RETURN_NONE;
}

/* wait(index, timeout_ns) -> woken; timeout_ns < 0: none. Releases the GIL. */
static PyObject *Core_wait(CoreObject *self, PyObject *args)
{
	int i;
	long long timeout;
	if (!PyArg_ParseTuple(args, "iL", &i, &timeout))
		return NULL;
	struct slot *s = get_slot(self, i, false);
	if (!s)
		return NULL;
	bool woken;
	Py_BEGIN_ALLOW_THREADS
	woken = kvm_vcpu_block_wait(&s->v, timeout);
	Py_END_ALLOW_THREADS
	return PyBool_FromLong(woken);
}

static PyObject *Core_wake(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_attached(self, args, &v) < 0)
		return NULL;
	kick_wake(v);
	Py_RETURN_NONE;
}

/* Python's halt polling: poll_begin (POLLING, request cleared), re-check, poll, and
 * poll_end. */
static PyObject *Core_poll_begin(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_index(self, args, &v) < 0)
		return NULL;
	atomic_store_explicit(&v->mode, POLLING, memory_order_seq_cst);
	atomic_store_explicit(&v->request, 0, memory_order_seq_cst);
	Py_RETURN_NONE;
}

static PyObject *Core_poll(CoreObject *self, PyObject *args)
{
	int i;
	unsigned long long end;
	if (!PyArg_ParseTuple(args, "iK", &i, &end))
		return NULL;
	struct slot *s = get_slot(self, i, false);
	if (!s)
		return NULL;
	bool got;
	Py_BEGIN_ALLOW_THREADS
	got = kvm_vcpu_poll(&s->v, end);
	Py_END_ALLOW_THREADS
	if (got) /* seq_cst: clear before the caller re-checks */
		atomic_store_explicit(&s->v.request, 0, memory_order_seq_cst);
	return PyBool_FromLong(got);
}

static PyObject *Core_poll_end(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_index(self, args, &v) < 0)
		return NULL;
	atomic_store_explicit(&v->mode, OUTSIDE_GUEST, memory_order_seq_cst);
	Py_RETURN_NONE;
}

/* trace_attach(index, buffer): record into `buffer` (4 int64 per record) from now on. */
static PyObject *Core_trace_attach(CoreObject *self, PyObject *args)
{
	int i;
	PyObject *obj;
	if (!PyArg_ParseTuple(args, "iO", &i, &obj))
		return NULL;
	struct slot *s = get_slot(self, i, true);
	if (!s)
		return NULL;
	if (s->buf[B_TRACE].obj) {
		PyErr_Format(PyExc_ValueError, "vCPU %d already has a trace ring", i);
		return NULL;
	}
	if (get_buf(obj, &s->buf[B_TRACE], 32, "trace ring") < 0)
		return NULL;
	s->v.trace_cap = (uint64_t)s->buf[B_TRACE].len / 32;
	s->v.trace_count = 0;
	s->v.trace = s->buf[B_TRACE].buf;
	Py_RETURN_NONE;
}

/* timer_trace_attach(buffer): the timer thread's trace ring (--trace), once. */
static PyObject *Core_timer_trace_attach(CoreObject *self, PyObject *arg)
{
	if (self->timer_trace.obj) {
		PyErr_SetString(PyExc_ValueError, "the timer thread already has a trace ring");
		return NULL;
	}
	if (get_buf(arg, &self->timer_trace, 32, "timer trace ring") < 0)
		return NULL;
	self->vm.timer_trace_cap = (uint64_t)self->timer_trace.len / 32;
	/* release: the capacity and the buffer before the thread may see the pointer. */
	atomic_store_explicit(&self->vm.timer_trace, (int64_t *)self->timer_trace.buf,
			      memory_order_release);
	Py_RETURN_NONE;
}

/* timer_trace_count() -> records the timer thread wrote (read after stop()). */
static PyObject *Core_timer_trace_count(CoreObject *self, PyObject *noargs)
{
	/* relaxed: read after timer_stop joined the writer. */
	return PyLong_FromUnsignedLongLong(
		atomic_load_explicit(&self->vm.timer_trace_count, memory_order_relaxed));
}

static PyObject *Core_trace_count(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_index(self, args, &v) < 0)
		return NULL;
	return PyLong_FromUnsignedLongLong(v->trace_count);
}

/* busy() -> the vCPU threads not asleep (the hang detector's and polling's count). */
static PyObject *Core_busy(CoreObject *self, PyObject *noargs)
{
	return PyLong_FromLong(atomic_load_explicit(&self->vm.busy, memory_order_relaxed));
}

static PyObject *Core_may_poll(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_index(self, args, &v) < 0)
		return NULL;
	return PyBool_FromLong(kvm_vcpu_may_poll(v));
}

/* take_request(index) -> bool: read and clear the request (tests, model vCPUs). */
static PyObject *Core_take_request(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_index(self, args, &v) < 0)
		return NULL;
	return PyBool_FromLong(atomic_exchange_explicit(&v->request, 0, memory_order_seq_cst));
}

static PyObject *Core_mode(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_index(self, args, &v) < 0)
		return NULL;
	return PyLong_FromLong(atomic_load_explicit(&v->mode, memory_order_seq_cst));
}

/* The fastpath on a model vCPU (tests): fast_wrmsr(i, msr, value[, t_exit_ns]) ->
 * fastpath; t_exit_ns (the exit's time, a TSC-deadline write's "now") defaults to now. */
static PyObject *Core_fast_wrmsr(CoreObject *self, PyObject *args)
{
	int i;
	unsigned int msr;
	unsigned long long value, t_exit = 0;
	if (!PyArg_ParseTuple(args, "iIK|K", &i, &msr, &value, &t_exit))
		return NULL;
	struct slot *s = get_slot(self, i, true);
	if (!s)
		return NULL;
	struct exit exit = {.reason = KVM_EXIT_X86_WRMSR, .a = msr, .b = value,
			    .t_exit_ns = t_exit ? t_exit : now_ns()};
	return PyLong_FromLong(handle_exit_irqoff(&s->v, &exit));
}

/* fast_mmio_write(i, gpa, length, value) -> fastpath. */
static PyObject *Core_fast_mmio_write(CoreObject *self, PyObject *args)
{
	int i;
	unsigned int len;
	unsigned long long gpa, value;
	if (!PyArg_ParseTuple(args, "iKIK", &i, &gpa, &len, &value))
		return NULL;
	struct slot *s = get_slot(self, i, true);
	if (!s)
		return NULL;
	struct vcpu *v = &s->v;
	if (len > 8)
		len = 8;
	struct exit exit = {.reason = KVM_EXIT_MMIO, .a = gpa, .b = len, .c = 1};
	memcpy(v->run->mmio.data, &value, 8);
	return PyLong_FromLong(handle_exit_irqoff(v, &exit));
}

/* fast_hlt(i, if_flag) -> fastpath. */
static PyObject *Core_fast_hlt(CoreObject *self, PyObject *args)
{
	int i, if_flag;
	if (!PyArg_ParseTuple(args, "ip", &i, &if_flag))
		return NULL;
	struct slot *s = get_slot(self, i, true);
	if (!s)
		return NULL;
	struct vcpu *v = &s->v;
	struct exit exit = {.reason = KVM_EXIT_HLT};
	v->run->if_flag = (uint8_t)if_flag;
	return PyLong_FromLong(handle_exit_irqoff(v, &exit));
}

/* inject(i, ready, if_flag, cr8) -> (vector injected or -1, request_interrupt_window):
 * the loop top's CR8 sync and injection on a model vCPU (tests). None if CR8 would
 * #GP (Python's business). */
static PyObject *Core_inject(CoreObject *self, PyObject *args)
{
	int i, ready, if_flag;
	unsigned long long cr8;
	if (!PyArg_ParseTuple(args, "ippK", &i, &ready, &if_flag, &cr8))
		return NULL;
	struct slot *s = get_slot(self, i, true);
	if (!s)
		return NULL;
	struct vcpu *v = &s->v;
	if (v->fd >= 0) {
		PyErr_SetString(PyExc_ValueError, "inject() is for model-only vCPUs");
		return NULL;
	}
	v->run->cr8 = cr8;
	if (!sync_cr8(v))
		Py_RETURN_NONE;
	v->run->ready_for_interrupt_injection = (uint8_t)ready;
	v->run->if_flag = (uint8_t)if_flag;
	int before = lapic_pending_vector(v);
	inject_pending_irq(v);
	int injected = (before >= 0 && ready && if_flag) ? before : -1;
	return Py_BuildValue("ii", injected, (int)v->run->request_interrupt_window);
}

/* (index, vector) of an attached vCPU, the vector 0..255; NULL with the error set. */
static struct slot *parse_index_vector(CoreObject *self, PyObject *args, int *vector)
{
	int i;
	if (!PyArg_ParseTuple(args, "ii", &i, vector))
		return NULL;
	struct slot *s = get_slot(self, i, true);
	if (s && (*vector < 0 || *vector > 255)) {
		PyErr_Format(PyExc_ValueError, "vector %d out of range", *vector);
		return NULL;
	}
	return s;
}

/* queue_interrupt(i, vector): kvm_queue_interrupt for Python's injection (vcpu.py
 * _inject_pending_events), on the vCPU's thread. */
static PyObject *Core_queue_interrupt(CoreObject *self, PyObject *args)
{
	int vector;
	struct slot *s = parse_index_vector(self, args, &vector);
	if (!s)
		return NULL;
	if (kvm_queue_interrupt(&s->v, vector) < 0) {
		errno = s->v.err;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	Py_RETURN_NONE;
}

/* events_changed(i): before a vCPU ioctl from Python (kvm_vcpu_events_changed). */
static PyObject *Core_events_changed(CoreObject *self, PyObject *args)
{
	struct vcpu *v;
	if (parse_attached(self, args, &v) < 0)
		return NULL;
	if (kvm_vcpu_events_changed(v) < 0) {
		errno = v->err;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	Py_RETURN_NONE;
}

static PyObject *Core_set(CoreObject *self, PyObject *args, PyObject *kwds)
{
	static char *kw[] = {"setting", "renumbered", "halt_poll_max_ns", "sync_events", NULL};
	int setting = -1, renumbered = -1, sync_events = -1;
	long long poll_max = -1;
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "|iiLi", kw, &setting, &renumbered, &poll_max,
					 &sync_events))
		return NULL;
	if (sync_events >= 0)
		self->vm.sync_events = sync_events != 0; /* before the vCPUs run */
	if (setting >= SETTING_OFF && setting <= SETTING_NATIVE)
		atomic_store_explicit(&self->vm.setting, setting, memory_order_relaxed);
	if (renumbered >= 0)
		atomic_store_explicit(&self->vm.renumbered, renumbered, memory_order_relaxed);
	if (poll_max >= 0)
		self->vm.halt_poll_max_ns = (uint64_t)poll_max;
	Py_RETURN_NONE;
}

static PyObject *Core_halt_poll_ns(CoreObject *self, PyObject *args)
{
	int i;
	long long set = -1;
	if (!PyArg_ParseTuple(args, "i|L", &i, &set))
		return NULL;
	struct slot *s = get_slot(self, i, false);
	if (!s)
		return NULL;
	if (set >= 0)
		s->v.halt_poll_ns = (uint64_t)set;
	return PyLong_FromUnsignedLongLong(s->v.halt_poll_ns);
}

/* irr_test_and_set(index, vector) -> was_set: IRR[vector] = 1 as one atomic exchange
 * (lapic_fast.c lapic_irr_test_and_set), for Python's senders (LocalApic.accept_fixed). */
static PyObject *Core_irr_test_and_set(CoreObject *self, PyObject *args)
{
	int vector;
	struct slot *s = parse_index_vector(self, args, &vector);
	if (!s)
		return NULL;
	return PyBool_FromLong(lapic_irr_test_and_set(&s->v.apic, vector));
}

/* adapt_halt_poll(index, halt_ns) -> the new window: KVM's grow/shrink after a halt
 * Python slept (vcpu_loop.c adapt_halt_poll; the vCPU's own thread). */
static PyObject *Core_adapt_halt_poll(CoreObject *self, PyObject *args)
{
	int i;
	unsigned long long halt_ns;
	if (!PyArg_ParseTuple(args, "iK", &i, &halt_ns))
		return NULL;
	struct slot *s = get_slot(self, i, false);
	if (!s)
		return NULL;
	adapt_halt_poll(&s->v, halt_ns);
	return PyLong_FromUnsignedLongLong(s->v.halt_poll_ns);
}

static PyMethodDef Core_methods[] = {
	{"attach", (PyCFunction)Core_attach, METH_VARARGS, "attach a vCPU's fd and memory"},
	{"run", (PyCFunction)Core_run, METH_VARARGS, "vcpu_enter_guest without the GIL"},
	{"kick", (PyCFunction)Core_kick, METH_VARARGS, "kvm_vcpu_kick(target, poster)"},
	{"send_posted_kicks", (PyCFunction)Core_send_posted_kicks, METH_VARARGS, ""},
	{"stop", (PyCFunction)Core_stop, METH_NOARGS, "stop every vCPU loop"},
	{"sleep_begin", (PyCFunction)Core_sleep_begin, METH_VARARGS, ""},
	{"sleep_end", (PyCFunction)Core_sleep_end, METH_VARARGS, ""},
	{"wake_clear", (PyCFunction)Core_wake_clear, METH_VARARGS, ""},
	{"wait", (PyCFunction)Core_wait, METH_VARARGS, "sleep on the wake token"},
	{"wake", (PyCFunction)Core_wake, METH_VARARGS, "leave a wake token"},
	{"poll_begin", (PyCFunction)Core_poll_begin, METH_VARARGS, ""},
	{"poll", (PyCFunction)Core_poll, METH_VARARGS, "halt-poll without the GIL"},
	{"poll_end", (PyCFunction)Core_poll_end, METH_VARARGS, ""},
	{"may_poll", (PyCFunction)Core_may_poll, METH_VARARGS, ""},
	{"busy", (PyCFunction)Core_busy, METH_NOARGS, "vCPU threads not asleep"},
	{"trace_attach", (PyCFunction)Core_trace_attach, METH_VARARGS, "native trace ring"},
	{"trace_count", (PyCFunction)Core_trace_count, METH_VARARGS, "records written"},
	{"timer_trace_attach", (PyCFunction)Core_timer_trace_attach, METH_O,
	 "the timer thread's trace ring"},
	{"timer_trace_count", (PyCFunction)Core_timer_trace_count, METH_NOARGS,
	 "records the timer thread wrote"},
	{"take_request", (PyCFunction)Core_take_request, METH_VARARGS, ""},
	{"mode", (PyCFunction)Core_mode, METH_VARARGS, ""},
	{"fast_wrmsr", (PyCFunction)Core_fast_wrmsr, METH_VARARGS, ""},
	{"fast_mmio_write", (PyCFunction)Core_fast_mmio_write, METH_VARARGS, ""},
	{"fast_hlt", (PyCFunction)Core_fast_hlt, METH_VARARGS, ""},
	{"inject", (PyCFunction)Core_inject, METH_VARARGS, ""},
	{"set", (PyCFunction)(void (*)(void))Core_set, METH_VARARGS | METH_KEYWORDS, ""},
	{"queue_interrupt", (PyCFunction)Core_queue_interrupt, METH_VARARGS, "kvm_queue_interrupt"},
	{"events_changed", (PyCFunction)Core_events_changed, METH_VARARGS, "before a vCPU ioctl"},
	{"halt_poll_ns", (PyCFunction)Core_halt_poll_ns, METH_VARARGS, ""},
	{"irr_test_and_set", (PyCFunction)Core_irr_test_and_set, METH_VARARGS,
	 "IRR[vector] = 1 as one atomic exchange; True if it was set"},
	{"adapt_halt_poll", (PyCFunction)Core_adapt_halt_poll, METH_VARARGS,
	 "KVM's grow/shrink of the halt-poll window after a halt that slept"},
	{NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "kvmpy._core.Core",
	.tp_basicsize = sizeof(CoreObject),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Core_init,
	.tp_dealloc = (destructor)Core_dealloc,
	.tp_methods = Core_methods,
	.tp_doc = "The native exit core of one VM (kvmpy/native/core.h).",
};

static struct PyModuleDef core_module = {
	PyModuleDef_HEAD_INIT, "kvmpy._core", "kvmpy's native exit core.", -1, NULL,
};

#define ADD(name) PyModule_AddIntConstant(m, #name, name)

PyMODINIT_FUNC PyInit__core(void)
{
	if (PyType_Ready(&CoreType) < 0)
		return NULL;
	PyObject *m = PyModule_Create(&core_module);
	if (!m)
		return NULL;
	Py_INCREF(&CoreType);
	PyModule_AddObject(m, "Core", (PyObject *)&CoreType);
	ADD(R_TPR); ADD(R_PPR); ADD(R_MODE); ADD(R_SW_ENABLED); ADD(R_APIC_ID); ADD(R_XAPIC_ID);
	ADD(R_LDR); ADD(R_DFR); ADD(R_X2APIC_LDR); ADD(R_SVR); ADD(R_ICR_LOW); ADD(R_ICR_DEST);
	ADD(R_SLOW_EVENTS); ADD(R_CR8); ADD(R_EXTINT); ADD(R_TIMER_MODE); ADD(R_NWORDS);
	ADD(Q_BASE_ADDRESS); ADD(Q_IPI_SENT); ADD(Q_IPI_NO_TARGET); ADD(Q_RX_FIXED);
	ADD(Q_RX_REJECTED); ADD(Q_INJECTED); ADD(Q_EOI); ADD(Q_SELF_IPI); ADD(Q_TIMER_DEADLINE);
	ADD(Q_TSC_DEADLINE); ADD(Q_TSC_HZ); ADD(Q_TSC_REF); ADD(Q_TSC_REF_NS);
	ADD(Q_NWORDS); ADD(REGS_BYTES);
	ADD(MAX_REASON); ADD(NBUCKETS); ADD(S_COUNT); ADD(S_FAST); ADD(S_FAST_TOTAL);
	ADD(S_ICR_FAST); ADD(S_HALT_POLL_OK); ADD(S_HALT_SLEPT); ADD(S_KICK_SIGNALS);
	ADD(S_KICK_WAKES); ADD(S_HANDED_OVER); ADD(S_RECORD_TIME); ADD(S_INJECT_SYNC); ADD(S_INJECT_IOCTL); ADD(S_HIST); ADD(S_ICR_HIST);
	ADD(S_KICK_HIST); ADD(S_WAKE_HIST); ADD(S_NWORDS);
	ADD(RET_EXIT); ADD(RET_EVENTS); ADD(RET_STOP); ADD(RET_ERROR);
	ADD(SETTING_OFF); ADD(SETTING_PYTHON); ADD(SETTING_NATIVE);
	ADD(OUTSIDE_GUEST); ADD(IN_GUEST); ADD(BLOCKED); ADD(POLLING);
	PyModule_AddIntConstant(m, "KVM_RUN_SIZE", sizeof(struct kvm_run));
	return m;
}
