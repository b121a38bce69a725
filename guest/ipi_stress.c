/* ipi_stress: every CPU sends random IPIs; handlers count them; counts must be exact.
 *
 * Command line: "ipis=N" ICR writes in total (split across CPUs, default 4000),
 * "seed=S", "mode=x2apic|xapic" (default x2apic), "cpus=C" (default all), "hlt=1"
 * (finished CPUs wait with sti;hlt instead of polling).
 *
 * Kinds, chosen at random per send: fixed physical to one CPU (maybe itself), logical
 * multicast to a random subset (x2APIC cluster / xAPIC flat), self (shorthand),
 * broadcast (shorthand all-including, or destination 0xffffffff / 0xff), all-excluding
 * self. An APIC holds one pending and one in-service interrupt per vector, so repeated
 * IPIs of one vector to one target would merge, legitimately. To count exactly, a
 * sender first claims a token for every (target, vector) the IPI will reach (lock
 * cmpxchg); the target's handler counts the interrupt and returns the token just
 * before EOI (DESIGN.md). Then received == sent for every (target, vector), and a
 * token that never comes back is a lost IPI.
 *
 * Output: "ipi_stress: ... icr_writes=W deliveries=D", per-CPU received totals,
 * "ipi_stress: lost=L invented=I", and "ipi_stress: ok" with exit code 0, else 1.
 */
#include "apic.h"

#define MAX_CPUS 16
#define NVEC 16
#define VEC_BASE 0x40
#define VEC_WAKE 0x60
#define DRAIN_POLLS 2000
#define NKINDS 5

enum { K_FIXED, K_LOGICAL, K_SELF, K_BROADCAST, K_ALLBUT };
static const char *const kind_name[NKINDS] = {"fixed", "logical", "self", "broadcast",
                                              "allbut"};

static volatile u32 token[MAX_CPUS][NVEC];
static volatile u32 received[MAX_CPUS][NVEC]; /* written by the target's handler only */
static u32 sent[MAX_CPUS][MAX_CPUS][NVEC];    /* [sender][target][vector], sender only */
static u32 kinds[MAX_CPUS][NKINDS];
static u32 busy[MAX_CPUS];
static volatile u32 finished;
static volatile u32 started;
static u32 ncpus, quota_each, x2, seed, use_hlt;
static u32 ids[MAX_CPUS];

static inline int claim(volatile u32 *t)
{
    u32 old = 0;
    asm volatile("lock cmpxchgl %2, %1" : "+a"(old), "+m"(*t) : "r"(1u) : "memory");
    return old == 0;
}

static inline u32 xorshift(u32 *s)
{
    u32 x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static void on_ipi(struct frame *f)
{
    u32 cpu = cpu_index();
    u32 v = f->vector - VEC_BASE;

    received[cpu][v]++;
    token[cpu][v] = 0; /* the token goes back just before EOI */
    apic_eoi();
}

static void on_wake(struct frame *f)
{
    (void)f;
    apic_eoi();
}

/* Claims the tokens of every target in `mask` for vector v; all or nothing. */
static int claim_all(u32 mask, u32 v)
{
    for (u32 t = 0; t < ncpus; t++) {
        if (!(mask & (1u << t)))
            continue;
        if (!claim(&token[t][v])) {
            for (u32 u = 0; u < t; u++)
                if (mask & (1u << u))
                    token[u][v] = 0;
            return 0;
        }
    }
    return 1;
}

static u32 logical_dest(u32 mask)
{
    u32 dest = 0;
    for (u32 t = 0; t < ncpus; t++)
        if (mask & (1u << t))
            dest |= x2 ? x2apic_ldr_of(ids[t]) & 0xffff : 1u << t;
    return dest; /* x2APIC: cluster 0 (IDs < 16) in bits 31:16 = 0; xAPIC flat: bit t */
}

static void send_one(u32 me, u32 *rng)
{
    u32 all = (1u << ncpus) - 1;
    for (;;) {
        u32 r = xorshift(rng);
        u32 kind = r % NKINDS;
        u32 v = (r >> 8) % NVEC;
        u32 vec = VEC_BASE + v;
        u32 mask, icr = APIC_DM_FIXED | APIC_INT_ASSERT | vec, dest = 0;

        switch (kind) {
        case K_FIXED: {
            u32 t = (r >> 16) % ncpus;
            mask = 1u << t;
            dest = ids[t];
            break;
        }
        case K_LOGICAL:
            mask = ((r >> 16) & all) ? ((r >> 16) & all) : 1u << ((r >> 20) % ncpus);
            icr |= APIC_DEST_LOGICAL;
            dest = logical_dest(mask);
            break;
        case K_SELF:
            mask = 1u << me;
            icr |= APIC_DEST_SELF;
            break;
        case K_BROADCAST:
            mask = all;
            if (r & 0x10000)
                icr |= APIC_DEST_ALLINC;
            else
                dest = x2 ? X2APIC_BROADCAST : XAPIC_BROADCAST;
            break;
        default: /* K_ALLBUT */
            if (ncpus == 1)
                continue;
            mask = all & ~(1u << me);
            icr |= APIC_DEST_ALLBUT;
            break;
        }
        if (!claim_all(mask, v)) {
            busy[me]++;
            pause();
            continue;
        }
        for (u32 t = 0; t < ncpus; t++)
            if (mask & (1u << t))
                sent[me][t][v]++;
        kinds[me][kind]++;
        apic_send_ipi(icr, dest);
        return;
    }
}

static void wait_for_everyone(void)
{
    for (;;) {
        cli();
        if (finished >= ncpus) {
            sti();
            return;
        }
        if (use_hlt)
            asm volatile("sti; hlt" : : : "memory");
        else {
            sti();
            pause();
        }
    }
}

static void run(u32 me)
{
    u32 rng = seed ^ ((me + 1) * 0x9e3779b9u);
    if (!rng)
        rng = 1;
    if (!x2) { /* xAPIC flat logical model: LDR bit `me` */
        apic_write(APIC_DFR, 0xffffffffu);
        apic_write(APIC_LDR, (1u << me) << 24);
    }
    __atomic_fetch_add(&started, 1, __ATOMIC_SEQ_CST);
    while (started < ncpus)
        pause();
    sti();
    for (u32 i = 0; i < quota_each; i++)
        send_one(me, &rng);
    if (__atomic_add_fetch(&finished, 1, __ATOMIC_SEQ_CST) == ncpus && ncpus > 1)
        apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | APIC_DEST_ALLBUT | VEC_WAKE, 0);
    wait_for_everyone();
}

static volatile u32 go;

void ap_main(u32 cpu)
{
    while (!go) /* the BSP fills ids[] and the quotas first */
        pause();
    run(cpu);
    for (;;) /* keep taking interrupts until the BSP has checked */
        asm volatile("sti; hlt" : : : "memory");
}

int main(struct multiboot_info *mbi)
{
    const char *cmdline = mbi_cmdline(mbi);
    const char *a;
    u32 total, icr_writes = 0, deliveries = 0, lost = 0, invented = 0, busy_all = 0;

    x2 = !((a = cmdline_value(cmdline, "mode")) && !strncmp(a, "xapic", 5));
    total = (a = cmdline_value(cmdline, "ipis")) ? parse_u32(a) : 4000;
    seed = (a = cmdline_value(cmdline, "seed")) ? parse_u32(a) : 1;
    use_hlt = (a = cmdline_value(cmdline, "hlt")) ? parse_u32(a) : 0;
    ncpus = (a = cmdline_value(cmdline, "cpus")) ? parse_u32(a) : smp_cpus_available();
    if (ncpus > MAX_CPUS || (!x2 && ncpus > 8)) {
        printf("ipi_stress: at most %u cpus in this mode\n", x2 ? MAX_CPUS : 8);
        return 1;
    }
    quota_each = total / ncpus;
    if (apic_enable(x2 ? APIC_MODE_X2APIC : APIC_MODE_XAPIC)) {
        printf("ipi_stress: cannot enable the APIC\n");
        return 1;
    }
    for (u32 v = 0; v < NVEC; v++)
        apic_set_handler(VEC_BASE + v, on_ipi);
    apic_set_handler(VEC_WAKE, on_wake);
    if (smp_start(ncpus) != ncpus) {
        printf("ipi_stress: only %u of %u cpus came up\n", smp_online(), ncpus);
        return 1;
    }
    for (u32 c = 0; c < ncpus; c++)
        ids[c] = smp_apic_id(c);
    printf("ipi_stress: cpus=%u mode=%s ipis=%u seed=%u hlt=%u\n", ncpus,
           x2 ? "x2apic" : "xapic", quota_each * ncpus, seed, use_hlt);
    go = 1;
    run(0);

    /* Drain: every token must come back (each handler returns its token). */
    for (u32 i = 0; i < DRAIN_POLLS; i++) {
        u32 out = 0;
        for (u32 t = 0; t < ncpus; t++)
            for (u32 v = 0; v < NVEC; v++)
                out |= token[t][v];
        if (!out)
            break;
        pause();
    }
    cli();
    for (u32 t = 0; t < ncpus; t++)
        for (u32 v = 0; v < NVEC; v++)
            if (token[t][v])
                printf("ipi_stress: token cpu %u vector %x never came back\n", t,
                       VEC_BASE + v);
    for (u32 t = 0; t < ncpus; t++) {
        u32 got = 0;
        for (u32 v = 0; v < NVEC; v++) {
            u32 s = 0;
            for (u32 c = 0; c < ncpus; c++)
                s += sent[c][t][v];
            if (received[t][v] < s)
                lost += s - received[t][v];
            if (received[t][v] > s)
                invented += received[t][v] - s;
            got += received[t][v];
        }
        deliveries += got;
        /* cpu indexes are in arrival order; the APIC ID names the vCPU */
        printf("ipi_stress: cpu %u apic %u received %u\n", t, smp_apic_id(t), got);
    }
    for (u32 c = 0; c < ncpus; c++) {
        busy_all += busy[c];
        for (u32 k = 0; k < NKINDS; k++)
            icr_writes += kinds[c][k];
    }
    printf("ipi_stress: icr_writes=%u deliveries=%u busy=%u\n", icr_writes, deliveries,
           busy_all);
    for (u32 k = 0; k < NKINDS; k++) {
        u32 n = 0;
        for (u32 c = 0; c < ncpus; c++)
            n += kinds[c][k];
        printf("ipi_stress: kind %s=%u\n", kind_name[k], n);
    }
    printf("ipi_stress: lost=%u invented=%u\n", lost, invented);
    if (lost || invented || icr_writes != quota_each * ncpus)
        return 1;
    printf("ipi_stress: ok\n");
    return 0;
}
