/* apic_ipi: exact per-CPU, per-vector IPI receive counts (SDM Vol. 3 10.6).
 *
 * Command line: "mode=x2apic" (default xapic). Needs at least 2 CPUs (uses up to 8).
 * Every sender keeps at most one IPI outstanding per (target, vector): it waits until
 * each target's handler has counted the IPI (before its EOI) before sending the next,
 * so the counts are exact. Cases, each with its own vector:
 *   phys     fixed, physical destination, from every CPU to every CPU
 *   logical  fixed, logical destination: xAPIC flat (LDR bit = CPU index), x2APIC
 *            cluster (LDR read back and checked against the ID); each CPU alone, all,
 *            and the odd-numbered CPUs
 *   self     shorthand self, from every CPU
 *   allinc   shorthand all-including-self, from CPU 0 and CPU 1
 *   allbut   shorthand all-excluding-self, from CPU 0 and CPU 1
 *   bcast    physical broadcast (0xff / 0xffffffff) and logical broadcast
 *   lowest   lowest priority to all CPUs (logical), 8 times: each reaches exactly one
 *   selfmsr  x2APIC SELF_IPI MSR 0x83f, on every CPU (x2APIC mode only)
 *   nmi      NMI, physical, from CPU 0 to every CPU (once per CPU: with no 32-bit IRET
 *            here, NMIs stay blocked after the first one a CPU takes)
 * Output: "apic_ipi: vector 0xVV NAME: got C0 C1 .. expected E0 E1 .." per case, then
 * "apic_ipi: ok" and exit 0, or "apic_ipi: FAILED (n errors)" and exit 1.
 */
#include "apic.h"

#define MAX_CPUS 8
#define WAIT_POLLS 1000000   /* ~7 s at ~7 us per emulated poll: only a failure waits */
#define SETTLE_POLLS 300
#define LOWEST_SENDS 8

#define V_PHYS 0x40
#define V_LOGICAL 0x41
#define V_SELF 0x42
#define V_ALLINC 0x43
#define V_ALLBUT 0x44
#define V_BCAST 0x45
#define V_LOWEST 0x46
#define V_SELFMSR 0x47
#define V_NMI 2

static volatile u32 count[MAX_CPUS][256];
static u32 expect[MAX_CPUS][256];
static u32 ncpus;
static u32 errors;
static int x2apic;
static struct spinlock print_lock;

static void count_irq(struct frame *f)
{
    count[cpu_index()][f->vector]++;
    apic_eoi();
}

static void count_nmi(struct frame *f)
{
    count[cpu_index()][f->vector]++;
}

static void fail(const char *what, u32 a, u32 b)
{
    spin_lock(&print_lock);
    printf("apic_ipi: FAIL %s (%u, %u)\n", what, a, b);
    errors++;
    spin_unlock(&print_lock);
}

/* The destination field that names exactly the CPUs in `cpus` (bit i = CPU index i):
 * logical (xAPIC flat LDR = 1 << index; x2APIC cluster LDR from the ID). */
static u32 logical_dest(u32 cpus)
{
    u32 dest = 0;

    for (u32 c = 0; c < ncpus; c++)
        if (cpus & (1u << c))
            dest |= x2apic ? x2apic_ldr_of(smp_apic_id(c)) : 1u << c;
    return dest;
}

/* Sends one IPI from this CPU and waits until every CPU in `targets` counted it. */
static void send_and_wait(u32 icr, u32 dest, u32 targets, u32 vector)
{
    u32 before[MAX_CPUS];
    u32 c, i;

    for (c = 0; c < ncpus; c++)
        before[c] = count[c][vector];
    if (vector == V_SELFMSR)
        wrmsr(X2APIC_MSR(APIC_SELF_IPI), vector);
    else
        apic_send_ipi(icr, dest);
    for (c = 0; c < ncpus; c++) {
        if (!(targets & (1u << c)))
            continue;
        expect[c][vector]++;
        for (i = 0; i < WAIT_POLLS && count[c][vector] == before[c]; i++)
            pause();
        if (i == WAIT_POLLS)
            fail("timeout: cpu, vector", c, vector);
    }
}

struct send {
    u32 icr, dest, targets, vector;
};

static void send_remote(void *arg)
{
    struct send *s = arg;

    send_and_wait(s->icr, s->dest, s->targets, s->vector);
}

/* send_and_wait() run by CPU `from`. */
static void send_from(u32 from, u32 icr, u32 dest, u32 targets, u32 vector)
{
    struct send s = { icr, dest, targets, vector };

    if (smp_call(from, send_remote, &s))
        fail("smp_call timeout: cpu, vector", from, vector);
}

static void setup_logical(void *arg)
{
    u32 cpu = cpu_index();
    u32 ldr;

    (void)arg;
    if (!x2apic) {
        apic_write(APIC_DFR, 0xffffffff);           /* flat model */
        apic_write(APIC_LDR, (1u << cpu) << 24);
        ldr = apic_read(APIC_LDR) >> 24;
        if (ldr != 1u << cpu)
            fail("xapic LDR: cpu, ldr", cpu, ldr);
        return;
    }
    ldr = apic_read(APIC_LDR);
    spin_lock(&print_lock);
    printf("apic_ipi: cpu %u x2apic id %u ldr %08x expected %08x\n", cpu, apic_id(), ldr,
           x2apic_ldr_of(apic_id()));
    spin_unlock(&print_lock);
    if (ldr != x2apic_ldr_of(apic_id()))
        fail("x2apic LDR: cpu, ldr", cpu, ldr);
}

static void report(u32 vector, const char *name)
{
    printf("apic_ipi: vector 0x%02x %s: got", vector, name);
    for (u32 c = 0; c < ncpus; c++)
        printf(" %u", count[c][vector]);
    printf(" expected");
    for (u32 c = 0; c < ncpus; c++)
        printf(" %u", expect[c][vector]);
    printf("\n");
}

static void lowest_priority(void)
{
    u32 all = (1u << ncpus) - 1, dest = logical_dest(all);
    u32 icr = APIC_DM_LOWEST | APIC_DEST_LOGICAL | V_LOWEST;

    for (u32 n = 0; n < LOWEST_SENDS; n++) {
        u32 before = 0, now = 0, i;

        for (u32 c = 0; c < ncpus; c++)
            before += count[c][V_LOWEST];
        apic_send_ipi(icr, dest);
        for (i = 0; i < WAIT_POLLS && now == before; i++) {
            pause();
            now = 0;
            for (u32 c = 0; c < ncpus; c++)
                now += count[c][V_LOWEST];
        }
        for (i = 0; i < SETTLE_POLLS; i++)
            pause();
        now = 0;
        for (u32 c = 0; c < ncpus; c++)
            now += count[c][V_LOWEST];
        if (now != before + 1)
            fail("lowest priority: send, receivers", n, now - before);
    }
}

int main(struct multiboot_info *mbi)
{
    const char *mode_arg = cmdline_value(mbi_cmdline(mbi), "mode");
    u32 all, c, lowest_total = 0;

    x2apic = mode_arg && !strncmp(mode_arg, "x2apic", 6);
    if (apic_enable(x2apic ? APIC_MODE_X2APIC : APIC_MODE_XAPIC)) {
        printf("apic_ipi: cannot enable the APIC\n");
        return 1;
    }
    for (u32 v = 0x20; v < SMP_WAKE_VECTOR; v++)
        apic_set_handler(v, count_irq);
    apic_set_handler(V_NMI, count_nmi);

    ncpus = smp_cpus_available();
    if (ncpus > MAX_CPUS)
        ncpus = MAX_CPUS;
    if (ncpus < 2 || smp_start(ncpus) != ncpus) {
        printf("apic_ipi: need at least 2 cpus online, have %u\n", smp_online());
        return 1;
    }
    all = (1u << ncpus) - 1;
    sti();
    printf("apic_ipi: mode %s, %u cpus\n", apic_mode_name(apic_mode()), ncpus);

    for (u32 from = 0; from < ncpus; from++)
        for (u32 to = 0; to < ncpus; to++)
            send_from(from, APIC_DM_FIXED | V_PHYS, smp_apic_id(to), 1u << to, V_PHYS);
    report(V_PHYS, "phys");

    for (c = 0; c < ncpus; c++)
        smp_call(c, setup_logical, NULL);
    for (c = 0; c < ncpus; c++)
        send_and_wait(APIC_DEST_LOGICAL | V_LOGICAL, logical_dest(1u << c), 1u << c, V_LOGICAL);
    send_and_wait(APIC_DEST_LOGICAL | V_LOGICAL, logical_dest(all), all, V_LOGICAL);
    send_and_wait(APIC_DEST_LOGICAL | V_LOGICAL, logical_dest(all & 0xaa), all & 0xaa,
                  V_LOGICAL);
    report(V_LOGICAL, "logical");

    for (c = 0; c < ncpus; c++)
        send_from(c, APIC_DEST_SELF | V_SELF, 0, 1u << c, V_SELF);
    report(V_SELF, "self");

    for (c = 0; c < 2; c++)
        send_from(c, APIC_DEST_ALLINC | V_ALLINC, 0, all, V_ALLINC);
    report(V_ALLINC, "allinc");

    for (c = 0; c < 2; c++)
        send_from(c, APIC_DEST_ALLBUT | V_ALLBUT, 0, all & ~(1u << c), V_ALLBUT);
    report(V_ALLBUT, "allbut");

    send_and_wait(V_BCAST, x2apic ? X2APIC_BROADCAST : XAPIC_BROADCAST, all, V_BCAST);
    send_and_wait(APIC_DEST_LOGICAL | V_BCAST, x2apic ? X2APIC_BROADCAST : XAPIC_BROADCAST,
                  all, V_BCAST);
    report(V_BCAST, "bcast");

    lowest_priority();
    printf("apic_ipi: vector 0x%02x lowest: got", V_LOWEST);
    for (c = 0; c < ncpus; c++) {
        printf(" %u", count[c][V_LOWEST]);
        lowest_total += count[c][V_LOWEST];
        expect[c][V_LOWEST] = count[c][V_LOWEST];   /* any CPU may win; checked: total */
    }
    printf(" total %u expected total %u\n", lowest_total, LOWEST_SENDS);
    if (lowest_total != LOWEST_SENDS)
        fail("lowest priority total", lowest_total, LOWEST_SENDS);

    if (x2apic) {
        for (c = 0; c < ncpus; c++)
            send_from(c, 0, 0, 1u << c, V_SELFMSR);
        report(V_SELFMSR, "selfmsr");
    }

    for (c = 0; c < ncpus; c++)
        send_and_wait(APIC_DM_NMI, smp_apic_id(c), 1u << c, V_NMI);
    report(V_NMI, "nmi");

    for (u32 i = 0; i < SETTLE_POLLS; i++)     /* let anything stray arrive */
        pause();
    errors += check_vector_counts("apic_ipi", count, expect, ncpus);
    if (errors) {
        printf("apic_ipi: FAILED (%u errors)\n", errors);
        return 1;
    }
    printf("apic_ipi: ok\n");
    return 0;
}
