/* ioapic_irq: the I/O APIC at 0xfec00000, driven through pc-testdev's lines at port
 * 0x2000 + n (82093AA datasheet; QEMU's hw/intc/ioapic.c). Exact per-CPU counts.
 *
 * Command line: "mode=x2apic" (default xapic). Needs at least 2 CPUs (uses up to 4).
 * The BSP programs one redirection entry per case and drives its line; the targets
 * (idle APs, or the BSP itself) count in their handlers, after everything else the
 * handler does, so a count seen means the handler is done. Cases, one vector each:
 *   regs      version 0x00170020, ID bits 27:24 only, arbitration = ID, index 0x40
 *             reads 0 (one line "regs: ok" or a FAIL each)
 *   edge      edge, physical, to every CPU; a second assertion without deassertion
 *             is no edge
 *   level     level, physical, to every CPU; the handler deasserts, then EOIs;
 *             remote IRR reads 0 afterwards
 *   retrig    level, to CPU 1; the handler EOIs with the line still asserted: the
 *             I/O APIC re-delivers, RETRIG times, until the handler deasserts
 *   coalesce  level, to CPU 1; the handler deasserts and reasserts (coalesced: remote
 *             IRR is set), deasserts, then EOIs: one interrupt
 *   maskedge  edge asserted while masked, then unmasked: lost (0)
 *   masklvl   level asserted while masked: delivered on unmask (1)
 *   bcast     edge, physical destination 0xff: every CPU
 *   logical   edge, logical, to the odd-numbered CPUs (xAPIC flat LDR = 1 << index,
 *             x2APIC cluster 0), GSI 16 (port 0x2010)
 *   directed  level, to CPU 1; the handler checks remote IRR 1, deasserts, writes the
 *             EOI register (0xfec00040), checks remote IRR 0, then EOIs its APIC
 *   lowest    lowest priority, logical, all CPUs, LOWEST times: LOWEST in total
 *   illegal   level, vector 5, to CPU 1: no interrupt, CPU 1's ESR has bit 6
 *             (receive illegal vector), remote IRR stays 0
 *   pit       the 8254's channel 0 in mode 2 at 1 kHz, ISA IRQ 0 = pin 2, edge, to CPU
 *             0: at least PIT_TICKS interrupts, then pin 2 masked ("pit: got N")
 * Output: "ioapic_irq: NAME: got C0 C1 .. expected E0 E1 .." per vectored case, then
 * "ioapic_irq: ok" and exit 0, or "ioapic_irq: FAILED (n errors)" and exit 1.
 */
#include "apic.h"

#define MAX_CPUS 4
#define WAIT_POLLS 1000000   /* ~7 s at ~7 us per emulated poll: only a failure waits */
#define SETTLE_POLLS 300
#define RETRIG 5
#define LOWEST 4
#define PIT_TICKS 5
#define PIT_1KHZ 1193

#define IOAPIC_BASE 0xfec00000u
#define IOAPIC_EOI 0x40
#define TESTDEV_IRQ 0x2000

#define RTE_LOGICAL (1u << 11)
#define RTE_REMOTE_IRR (1u << 14)
#define RTE_LEVEL (1u << 15)
#define RTE_MASKED (1u << 16)

enum { P_EDGE = 3, P_LEVEL,    /* pin 2 is the PIT's (ISA IRQ 0) */
       P_RETRIG, P_COALESCE, P_MASK_EDGE, P_MASK_LEVEL, P_BCAST,
       P_LOGICAL = 16, P_DIRECTED, P_LOWEST, P_ILLEGAL };

#define V_EDGE 0x50
#define V_LEVEL 0x51
#define V_RETRIG 0x52
#define V_COALESCE 0x53
#define V_MASK_EDGE 0x54
#define V_MASK_LEVEL 0x55
#define V_BCAST 0x56
#define V_LOGICAL 0x57
#define V_DIRECTED 0x58
#define V_LOWEST 0x59
#define V_PIT 0x5a

static volatile u32 count[MAX_CPUS][256];
static u32 expect[MAX_CPUS][256];
static u32 ncpus, errors;
static int x2apic;
static volatile u32 directed_before, directed_after;
static volatile u32 esr_seen;
static struct spinlock print_lock;

static void fail(const char *what, u32 a, u32 b)
{
    spin_lock(&print_lock);
    printf("ioapic_irq: FAIL %s (%x, %x)\n", what, a, b);
    errors++;
    spin_unlock(&print_lock);
}

/* ---- the I/O APIC and the lines ---- */

static volatile u32 *const ioregsel = (volatile u32 *)IOAPIC_BASE;
static volatile u32 *const iowin = (volatile u32 *)(IOAPIC_BASE + 0x10);
static struct spinlock ioapic_lock;     /* IOREGSEL + IOWIN is two accesses */

static u32 io_read(u32 index)
{
    u32 v;

    spin_lock(&ioapic_lock);
    *ioregsel = index;
    v = *iowin;
    spin_unlock(&ioapic_lock);
    return v;
}

static void io_write(u32 index, u32 value)
{
    spin_lock(&ioapic_lock);
    *ioregsel = index;
    *iowin = value;
    spin_unlock(&ioapic_lock);
}

static void program(u32 pin, u32 low, u32 dest)
{
    io_write(0x11 + 2 * pin, dest << 24);
    io_write(0x10 + 2 * pin, low);
}

static u32 remote_irr(u32 pin)
{
    return !!(io_read(0x10 + 2 * pin) & RTE_REMOTE_IRR);
}

static void line(u32 pin, u32 level)
{
    outb(TESTDEV_IRQ + pin, level);
}

/* ---- handlers: count last ---- */

static void count_edge(struct frame *f)
{
    apic_eoi();
    count[cpu_index()][f->vector]++;
}

static void level_handler(struct frame *f)
{
    u32 cpu = cpu_index(), v = f->vector;

    switch (v) {
    case V_RETRIG:
        if (count[cpu][v] + 1 == RETRIG)
            line(P_RETRIG, 0);
        break;
    case V_COALESCE:
        line(P_COALESCE, 0);
        line(P_COALESCE, 1);
        line(P_COALESCE, 0);
        break;
    case V_DIRECTED:
        directed_before = remote_irr(P_DIRECTED);
        line(P_DIRECTED, 0);
        *(volatile u32 *)(IOAPIC_BASE + IOAPIC_EOI) = V_DIRECTED;
        directed_after = remote_irr(P_DIRECTED);
        break;
    case V_LEVEL:
        line(P_LEVEL, 0);
        break;
    case V_MASK_LEVEL:
        line(P_MASK_LEVEL, 0);
        break;
    }
    apic_eoi();
    count[cpu][v]++;
}

/* ---- waiting ---- */

static u32 total(u32 vector)
{
    u32 n = 0;

    for (u32 c = 0; c < ncpus; c++)
        n += count[c][vector];
    return n;
}

static void wait_total(u32 vector, u32 want)
{
    u32 i;

    for (i = 0; i < WAIT_POLLS && total(vector) < want; i++)
        pause();
    if (i == WAIT_POLLS)
        fail("timeout: vector, count", vector, total(vector));
}

static void settle(void)
{
    for (u32 i = 0; i < SETTLE_POLLS; i++)
        pause();
}

static void report(u32 vector, const char *name)
{
    printf("ioapic_irq: %s: got", name);
    for (u32 c = 0; c < ncpus; c++)
        printf(" %u", count[c][vector]);
    printf(" expected");
    for (u32 c = 0; c < ncpus; c++)
        printf(" %u", expect[c][vector]);
    printf("\n");
}

/* ---- cases ---- */

static void regs(void)
{
    u32 id = io_read(0), ver = io_read(1);

    if (ver != 0x00170020)
        fail("version", ver, 0x00170020);
    io_write(1, ~ver);
    if (io_read(1) != ver)
        fail("version is read-only", io_read(1), ver);
    io_write(0, ~id);
    if ((io_read(0) ^ id) != 0x0f000000)
        fail("id bits", io_read(0), id);
    io_write(0, 0x0a000000);
    if (io_read(2) != 0x0a000000)
        fail("arbitration follows id", io_read(2), 0x0a000000);
    io_write(2, 0);
    if (io_read(2) != 0x0a000000)
        fail("arbitration is read-only", io_read(2), 0x0a000000);
    io_write(0x40, 0xffffffff);
    if (io_read(0x40) != 0)
        fail("index 0x40", io_read(0x40), 0);
    printf("ioapic_irq: regs: %s\n", errors ? "FAILED" : "ok");
}

static void setup_logical(void *arg)
{
    (void)arg;
    if (!x2apic) {
        apic_write(APIC_DFR, 0xffffffff);
        apic_write(APIC_LDR, (1u << cpu_index()) << 24);
    }
}

static void read_esr(void *arg)
{
    (void)arg;
    apic_write(APIC_ESR, 0);
    esr_seen = apic_read(APIC_ESR);
}

int main(struct multiboot_info *mbi)
{
    const char *mode_arg = cmdline_value(mbi_cmdline(mbi), "mode");
    u32 c, dest, odd = 0, lowest_total;

    x2apic = mode_arg && !strncmp(mode_arg, "x2apic", 6);
    if (apic_enable(x2apic ? APIC_MODE_X2APIC : APIC_MODE_XAPIC)) {
        printf("ioapic_irq: cannot enable the APIC\n");
        return 1;
    }
    for (u32 v = V_EDGE; v <= V_PIT; v++)
        apic_set_handler(v, count_edge);
    apic_set_handler(V_LEVEL, level_handler);
    apic_set_handler(V_RETRIG, level_handler);
    apic_set_handler(V_COALESCE, level_handler);
    apic_set_handler(V_MASK_LEVEL, level_handler);
    apic_set_handler(V_DIRECTED, level_handler);
    ncpus = smp_cpus_available();
    if (ncpus > MAX_CPUS)
        ncpus = MAX_CPUS;
    if (ncpus < 2 || smp_start(ncpus) != ncpus) {
        printf("ioapic_irq: need at least 2 cpus online, have %u\n", smp_online());
        return 1;
    }
    sti();
    printf("ioapic_irq: mode %s, %u cpus\n", apic_mode_name(apic_mode()), ncpus);

    regs();

    for (c = 0; c < ncpus; c++) {
        program(P_EDGE, V_EDGE, smp_apic_id(c));
        line(P_EDGE, 1);
        expect[c][V_EDGE]++;
        wait_total(V_EDGE, c + 1);
        line(P_EDGE, 1);                        /* no 0->1 transition: no edge */
        settle();
        line(P_EDGE, 0);
    }
    report(V_EDGE, "edge");

    for (c = 0; c < ncpus; c++) {
        program(P_LEVEL, RTE_LEVEL | V_LEVEL, smp_apic_id(c));
        expect[c][V_LEVEL]++;
        line(P_LEVEL, 1);
        wait_total(V_LEVEL, c + 1);
        if (remote_irr(P_LEVEL))
            fail("level: remote IRR after EOI, cpu", c, 1);
    }
    report(V_LEVEL, "level");

    program(P_RETRIG, RTE_LEVEL | V_RETRIG, smp_apic_id(1));
    expect[1][V_RETRIG] = RETRIG;
    line(P_RETRIG, 1);
    wait_total(V_RETRIG, RETRIG);
    settle();
    report(V_RETRIG, "retrig");

    program(P_COALESCE, RTE_LEVEL | V_COALESCE, smp_apic_id(1));
    expect[1][V_COALESCE] = 1;
    line(P_COALESCE, 1);
    wait_total(V_COALESCE, 1);
    settle();
    report(V_COALESCE, "coalesce");

    program(P_MASK_EDGE, RTE_MASKED | V_MASK_EDGE, smp_apic_id(1));
    line(P_MASK_EDGE, 1);
    line(P_MASK_EDGE, 0);
    program(P_MASK_EDGE, V_MASK_EDGE, smp_apic_id(1));
    settle();
    report(V_MASK_EDGE, "maskedge");

    program(P_MASK_LEVEL, RTE_MASKED | RTE_LEVEL | V_MASK_LEVEL, smp_apic_id(1));
    line(P_MASK_LEVEL, 1);
    settle();
    if (total(V_MASK_LEVEL))
        fail("masked level delivered", total(V_MASK_LEVEL), 0);
    expect[1][V_MASK_LEVEL] = 1;
    program(P_MASK_LEVEL, RTE_LEVEL | V_MASK_LEVEL, smp_apic_id(1));
    wait_total(V_MASK_LEVEL, 1);
    report(V_MASK_LEVEL, "masklvl");

    program(P_BCAST, V_BCAST, 0xff);
    for (c = 0; c < ncpus; c++)
        expect[c][V_BCAST] = 1;
    line(P_BCAST, 1);
    line(P_BCAST, 0);
    wait_total(V_BCAST, ncpus);
    report(V_BCAST, "bcast");

    for (c = 0; c < ncpus; c++)
        smp_call(c, setup_logical, NULL);
    for (c = 1; c < ncpus; c += 2) {
        odd |= x2apic ? x2apic_ldr_of(smp_apic_id(c)) : 1u << c;
        expect[c][V_LOGICAL] = 1;
    }
    program(P_LOGICAL, RTE_LOGICAL | V_LOGICAL, odd);
    line(P_LOGICAL, 1);
    line(P_LOGICAL, 0);
    wait_total(V_LOGICAL, ncpus / 2);
    report(V_LOGICAL, "logical");

    program(P_DIRECTED, RTE_LEVEL | V_DIRECTED, smp_apic_id(1));
    expect[1][V_DIRECTED] = 1;
    line(P_DIRECTED, 1);
    wait_total(V_DIRECTED, 1);
    printf("ioapic_irq: directed: remote IRR %u before, %u after the EOI register\n",
           directed_before, directed_after);
    if (directed_before != 1 || directed_after != 0)
        fail("directed EOI: remote IRR before, after", directed_before, directed_after);
    report(V_DIRECTED, "directed");

    dest = 0;
    for (c = 0; c < ncpus; c++)
        dest |= x2apic ? x2apic_ldr_of(smp_apic_id(c)) : 1u << c;
    program(P_LOWEST, APIC_DM_LOWEST | RTE_LOGICAL | V_LOWEST, dest);
    for (u32 n = 0; n < LOWEST; n++) {
        line(P_LOWEST, 1);
        line(P_LOWEST, 0);
        wait_total(V_LOWEST, n + 1);
    }
    settle();
    lowest_total = total(V_LOWEST);
    printf("ioapic_irq: lowest: got");
    for (c = 0; c < ncpus; c++) {
        printf(" %u", count[c][V_LOWEST]);
        expect[c][V_LOWEST] = count[c][V_LOWEST];  /* any CPU may win: total checked */
    }
    printf(" total %u expected total %u\n", lowest_total, LOWEST);
    if (lowest_total != LOWEST)
        fail("lowest priority total", lowest_total, LOWEST);

    program(P_ILLEGAL, RTE_LEVEL | 5, smp_apic_id(1));
    line(P_ILLEGAL, 1);
    settle();
    smp_call(1, read_esr, NULL);
    printf("ioapic_irq: illegal: esr %x remote IRR %u\n", esr_seen, remote_irr(P_ILLEGAL));
    if (!(esr_seen & APIC_ESR_RECV_ILLEGAL_VECTOR) || remote_irr(P_ILLEGAL))
        fail("illegal vector: esr, remote IRR", esr_seen, remote_irr(P_ILLEGAL));
    line(P_ILLEGAL, 0);

    outb(0x43, 0x34);                       /* channel 0, lobyte/hibyte, mode 2 */
    outb(0x40, PIT_1KHZ & 0xff);
    outb(0x40, PIT_1KHZ >> 8);
    program(2, V_PIT, smp_apic_id(0));
    wait_total(V_PIT, PIT_TICKS);
    program(2, RTE_MASKED | V_PIT, smp_apic_id(0));
    settle();
    expect[0][V_PIT] = count[0][V_PIT];     /* the rate is the host's: at least checked */
    printf("ioapic_irq: pit: got %u expected at least %u\n", count[0][V_PIT], PIT_TICKS);

    settle();
    errors += check_vector_counts("ioapic_irq", count, expect, ncpus);
    if (errors) {
        printf("ioapic_irq: FAILED (%u errors)\n", errors);
        return 1;
    }
    printf("ioapic_irq: ok\n");
    return 0;
}
