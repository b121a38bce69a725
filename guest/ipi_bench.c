/* ipi_bench: IPI latencies measured with the guest's TSC, for `kvmpy bench ipi`.
 *
 * Command line: "n=K" samples per test (default 300, at most MAXS), "mode=x2apic|xapic"
 * (default x2apic), "cpus=N" (default all), "scale=1" for the broadcast/multicast
 * scaling tests instead of the two-CPU tests, "only=vmexit" for just the two vmexit
 * tests (what `kvmpy bench ipi --breakdown` traces).
 *
 * Two-CPU tests (CPU 0 measures, CPU 1 responds), as kvm-unit-tests x86/vmexit.c:
 *   rt        round trip: CPU 0 IPIs CPU 1, whose handler IPIs CPU 0 back; TSC before
 *             the send to the moment CPU 0 sees the answer (vmexit's "ipi").
 *   oneway    TSC before the ICR write on CPU 0 to the TSC at CPU 1's handler entry.
 *   rt_halt, oneway_halt   the same with CPU 1 halted (sti; hlt) instead of polling
 *             (vmexit's "ipi_halt").
 *   send      sender-side cost of one ICR write to a destination that matches no CPU
 *             (no delivery, no kick): TSC before and after the write.
 *   send_kick the same to CPU 1 while it runs a polling loop (the kick included).
 *   vmexit_ipi, vmexit_ipi_halt   exactly kvm-unit-tests x86/vmexit.c's "ipi" and
 *             "ipi_halt": CPU 1 idles in hlt; CPU 0 runs on_cpu(1, nop, 0) as
 *             lib/x86/smp.c does (take a lock, count the CPU active, clear ipi_done,
 *             set the function, write ICR, spin on ipi_done with no pause, unlock); CPU
 *             1's handler calls the function, decrements active, sets ipi_done, EOIs.
 *             vmexit_ipi times on_cpu (vmexit's tsc_ipi); vmexit_ipi_halt times the
 *             whole iteration, on_cpu and a 2000-cycle spin (vmexit's per-iteration
 *             figure), so CPU 1 is back in hlt before the next IPI.
 * Scaling tests (every CPU but 0 responds from sti;hlt), cost per target:
 *   bcast     one all-excluding-self IPI, until every target has acknowledged, / N-1.
 *   mcast     logical (x2APIC cluster / xAPIC flat) IPIs, one per cluster, / N-1.
 *
 * Samples (u32 TSC deltas) stay in guest memory; for each test the guest prints
 *   "ipi_bench: test NAME n=K addr=0xADDR"
 * and the host reads them from guest RAM after the VM ends. With "report=median" it also
 * prints each test's median, for hosts that only see the console (`kvmpy bench ab`):
 *   "ipi_bench: median NAME CYCLES"
 */
#include "apic.h"

#define MAXS 4096
#define NTESTS 10
#define VEC_PING 0x50
#define VEC_PONG 0x51
#define VEC_OW 0x52
#define VEC_ACK 0x53
#define VEC_CALL 0x54
#define NOBODY_X2 0x7fff0000u
#define NOBODY_X 0xfeu

enum { T_RT, T_OW, T_RT_HALT, T_OW_HALT, T_SEND, T_SEND_KICK, T_VMEXIT_IPI,
       T_VMEXIT_IPI_HALT, T_BCAST, T_MCAST };
static const char *const test_name[NTESTS] = {"rt", "oneway", "rt_halt", "oneway_halt",
                                              "send", "send_kick", "vmexit_ipi",
                                              "vmexit_ipi_halt", "bcast", "mcast"};

static u32 samples[NTESTS][MAXS];
static volatile u32 pong, arrived, acks, responder_halts, phase_done;
static volatile u64 t_recv;
static u32 x2, ncpus, nsamples, only_vmexit, report_median;
static u32 scratch[MAXS]; /* report=median sorts a copy: the host may read samples */
static u32 ids[64];

static inline u32 delta(u64 a, u64 b) { return b - a > 0xffffffffu ? 0xffffffffu : (u32)(b - a); }

static void on_ping(struct frame *f) /* CPU 1: answer CPU 0 */
{
    (void)f;
    apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | VEC_PONG, ids[0]);
    apic_eoi();
}

static void on_pong(struct frame *f) /* CPU 0 */
{
    (void)f;
    pong = 1;
    apic_eoi();
}

static void on_oneway(struct frame *f) /* CPU 1: the time of arrival */
{
    (void)f;
    t_recv = rdtsc();
    arrived = 1;
    apic_eoi();
}

static void on_ack(struct frame *f) /* scaling: every target */
{
    (void)f;
    __atomic_fetch_add(&acks, 1, __ATOMIC_SEQ_CST);
    apic_eoi();
}

/* lib/x86/smp.c's on_cpu() and its IPI handler, with wait = 1. */
static volatile u32 ipi_lock, ipi_done;
static volatile int active_cpus;
static void (*volatile ipi_function)(void *);

static void nop(void *junk) { (void)junk; }

static void on_call(struct frame *f) /* CPU 1: smp.c ipi() */
{
    (void)f;
    ipi_function(0);
    __atomic_fetch_sub(&active_cpus, 1, __ATOMIC_SEQ_CST);
    ipi_done = 1;
    apic_eoi();
}

static void on_cpu1(void (*function)(void *)) /* CPU 0: smp.c __on_cpu(1, f, 0, 1) */
{
    while (__atomic_exchange_n(&ipi_lock, 1, __ATOMIC_ACQUIRE))
        pause();
    __atomic_fetch_add(&active_cpus, 1, __ATOMIC_SEQ_CST);
    ipi_done = 0;
    ipi_function = function;
    apic_send_ipi(APIC_INT_ASSERT | APIC_DM_FIXED | VEC_CALL, ids[1]);
    while (!ipi_done)
        ;
    __atomic_store_n(&ipi_lock, 0, __ATOMIC_RELEASE);
}

static void vmexit_tests(void)
{
    for (u32 i = 0; i < nsamples; i++) { /* vmexit.c ipi() */
        u64 t0 = rdtsc();
        on_cpu1(nop);
        samples[T_VMEXIT_IPI][i] = delta(t0, rdtsc());
    }
    for (u32 i = 0; i < nsamples; i++) { /* vmexit.c ipi_halt() */
        u64 t0 = rdtsc(), t;
        on_cpu1(nop);
        t = rdtsc() + 2000;
        while (rdtsc() < t)
            ;
        samples[T_VMEXIT_IPI_HALT][i] = delta(t0, rdtsc());
    }
}

static volatile u32 go;
static void set_flat_ldr(void *arg);

/* Tests first..last: where their samples are, and (report=median) their medians. */
static void report(u32 first, u32 last)
{
    for (u32 t = first; t <= last; t++)
        printf("ipi_bench: test %s n=%u addr=0x%x\n", test_name[t], nsamples, (u32)samples[t]);
    for (u32 t = first; t <= last && report_median && nsamples; t++)
        printf("ipi_bench: median %s %u\n", test_name[t],
               median_u32(memcpy(scratch, samples[t], 4 * nsamples), nsamples));
}

void ap_main(u32 cpu)
{
    (void)cpu;
    if (!x2)
        set_flat_ldr(0);
    while (!go)
        pause();
    for (;;) {
        if (responder_halts)
            asm volatile("sti; hlt" : : : "memory");
        else {
            sti();
            pause();
        }
    }
}

static void spin_until(volatile u32 *flag)
{
    while (!*flag)
        pause();
}

static void two_cpu_tests(void)
{
    u32 nobody = x2 ? NOBODY_X2 : NOBODY_X;

    if (only_vmexit) {
        responder_halts = 1;
        for (u32 i = 0; i < 50000; i++) /* let CPU 1 reach its hlt */
            pause();
        vmexit_tests();
        report(T_VMEXIT_IPI, T_VMEXIT_IPI_HALT);
        return;
    }
    for (u32 halt = 0; halt < 2; halt++) {
        responder_halts = halt;
        for (u32 i = 0; i < 50000 && halt; i++) /* let CPU 1 reach its hlt */
            pause();
        for (u32 i = 0; i < nsamples; i++) {
            u64 t0, t1;
            pong = 0;
            t0 = rdtsc();
            apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | VEC_PING, ids[1]);
            spin_until(&pong);
            t1 = rdtsc();
            samples[halt ? T_RT_HALT : T_RT][i] = delta(t0, t1);
        }
        for (u32 i = 0; i < nsamples; i++) {
            u64 t0;
            arrived = 0;
            t0 = rdtsc();
            apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | VEC_OW, ids[1]);
            spin_until(&arrived);
            samples[halt ? T_OW_HALT : T_OW][i] = delta(t0, t_recv);
        }
        if (halt)
            vmexit_tests();
    }
    responder_halts = 0;
    for (u32 i = 0; i < 50000; i++) /* CPU 1 back to polling, in guest mode */
        pause();
    for (u32 i = 0; i < nsamples; i++) {
        u64 t0 = rdtsc();
        apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | VEC_OW, nobody);
        samples[T_SEND][i] = delta(t0, rdtsc());
    }
    for (u32 i = 0; i < nsamples; i++) {
        u64 t0;
        arrived = 0;
        t0 = rdtsc();
        apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | VEC_OW, ids[1]);
        samples[T_SEND_KICK][i] = delta(t0, rdtsc());
        spin_until(&arrived);
    }
    report(T_RT, T_VMEXIT_IPI_HALT);
}

static void scaling_tests(void)
{
    u32 targets = ncpus - 1;

    /* Targets idle in sti;hlt, as idle CPUs do: N-1 vCPUs spinning in the guest would
     * only measure how a 2-core host shares its time among them. */
    responder_halts = 1;
    for (u32 i = 0; i < 50000; i++)
        pause();
    for (u32 i = 0; i < nsamples; i++) {
        u64 t0;
        acks = 0;
        t0 = rdtsc();
        apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | APIC_DEST_ALLBUT | VEC_ACK, 0);
        while (acks < targets)
            pause();
        samples[T_BCAST][i] = delta(t0, rdtsc()) / targets;
    }
    for (u32 i = 0; i < nsamples; i++) {
        u64 t0;
        acks = 0;
        t0 = rdtsc();
        if (x2) { /* one logical IPI per cluster of 16 x2APIC IDs */
            u32 masks[4] = {0, 0, 0, 0}; /* CPU indexes are in arrival order, not ID order */
            for (u32 c = 1; c < ncpus; c++)
                masks[ids[c] >> 4] |= 1u << (ids[c] & 15);
            for (u32 cluster = 0; cluster < 4; cluster++)
                if (masks[cluster])
                    apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | APIC_DEST_LOGICAL | VEC_ACK,
                                  (cluster << 16) | masks[cluster]);
        } else { /* xAPIC flat: LDR bit c for c < 8 */
            apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | APIC_DEST_LOGICAL | VEC_ACK,
                          ((1u << ncpus) - 1) & ~1u);
        }
        while (acks < targets)
            pause();
        samples[T_MCAST][i] = delta(t0, rdtsc()) / targets;
    }
    report(T_BCAST, T_MCAST);
}

static void set_flat_ldr(void *arg)
{
    (void)arg;
    apic_write(APIC_DFR, 0xffffffffu);
    apic_write(APIC_LDR, (1u << cpu_index()) << 24);
}

int main(struct multiboot_info *mbi)
{
    const char *cmdline = mbi_cmdline(mbi);
    const char *a;
    u32 scale;

    x2 = !((a = cmdline_value(cmdline, "mode")) && !strncmp(a, "xapic", 5));
    nsamples = (a = cmdline_value(cmdline, "n")) ? parse_u32(a) : 300;
    scale = (a = cmdline_value(cmdline, "scale")) ? parse_u32(a) : 0;
    only_vmexit = (a = cmdline_value(cmdline, "only")) && !strncmp(a, "vmexit", 6);
    report_median = (a = cmdline_value(cmdline, "report")) && !strncmp(a, "median", 6);
    ncpus = (a = cmdline_value(cmdline, "cpus")) ? parse_u32(a) : smp_cpus_available();
    if (nsamples > MAXS)
        nsamples = MAXS;
    if (ncpus < 2 || ncpus > 64 || (!x2 && scale && ncpus > 8)) {
        printf("ipi_bench: need 2..64 cpus (xapic scaling: at most 8), have %u\n", ncpus);
        return 1;
    }
    if (apic_enable(x2 ? APIC_MODE_X2APIC : APIC_MODE_XAPIC)) {
        printf("ipi_bench: cannot enable the APIC\n");
        return 1;
    }
    apic_set_handler(VEC_PING, on_ping);
    apic_set_handler(VEC_PONG, on_pong);
    apic_set_handler(VEC_OW, on_oneway);
    apic_set_handler(VEC_ACK, on_ack);
    apic_set_handler(VEC_CALL, on_call);
    if (smp_start(ncpus) != ncpus) {
        printf("ipi_bench: only %u of %u cpus came up\n", smp_online(), ncpus);
        return 1;
    }
    for (u32 c = 0; c < ncpus; c++)
        ids[c] = smp_apic_id(c);
    if (!x2)
        set_flat_ldr(0);
    printf("ipi_bench: cpus=%u mode=%s n=%u scale=%u\n", ncpus, x2 ? "x2apic" : "xapic",
           nsamples, scale);
    go = 1;
    sti();
    if (scale)
        scaling_tests();
    else
        two_cpu_tests();
    printf("ipi_bench: done\n");
    return 0;
}
