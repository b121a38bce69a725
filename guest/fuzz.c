/* fuzz: a hostile guest. Every CPU performs random APIC, MSR, port and MMIO operations
 * and keeps running across the #GPs it takes; a subset of fixed IPIs is counted exactly.
 *
 * Command line: "seed=S" (default 1), "ops=N" operations in total, split across the CPUs
 * (default 2000), "cpus=C" (default all, at most 8), "mode=xapic|x2apic|mixed" (the mode
 * of the calm phases, default mixed), "initsipi=1" (the BSP also resets APs mid-run).
 *
 * Operations, chosen at random: RDMSR/WRMSR of random x2APIC MSRs 0x800-0x8ff with random
 * values; IA32_APIC_BASE writes (invalid transitions, reserved bits, EN/EXTD switches,
 * relocation of the xAPIC page), checked against the SDM 10.12.5 rules and read back;
 * TSC_DEADLINE (0x6e0) reads and writes; xAPIC page reads and writes (any offset, sizes
 * 1/2/4, at the relocated base too), and reads of the page outside xAPIC mode (all ones);
 * IN/OUT of sizes 1/2/4 and REP INS/OUTS to random ports (never 0xf4-0xf7, the exit port,
 * nor COM1, nor the PICs 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1, which would let the timer's
 * IRQ 0 in at vector 8); reads (all ones) and writes of unclaimed MMIO
 * 0xd0000000-0xfebfffff; random
 * ICR values (reserved bits, illegal vectors 0-15, every delivery mode and shorthand);
 * NMIs; self-IPIs; LVT and timer programming (one-shot, periodic, TSC-deadline); TPR;
 * reads of random other MSRs; the I/O APIC at 0xfec00000: raw accesses anywhere in its
 * 4 KiB window (any size, IOREGSEL aliases, the EOI register, holes), redirection
 * entries with random fields (illegal vectors, every delivery mode but INIT, random
 * destinations, level and edge, reserved bits), out-of-range indexes, ID/version/
 * arbitration writes, EOI-register writes, and pc-testdev's lines (port 0x2000 + n, some
 * beyond the 24), so level lines stay asserted and storm. Its oracles: IOREGSEL reads
 * back its 8 bits, IOWIN reads ID bits 27:24 only, arbitration = ID, version 0x170020,
 * 0 for indexes with no register and for accesses not 32 bits wide, entries read back
 * as written with delivery status 0 and no remote IRR on an edge entry (ioapic_bad=).
 * The guest takes a lock around each IOREGSEL/IOWIN pair (as an OS would), with
 * interrupts off; a CPU whose interrupt handler sees a burst masks every entry and
 * deasserts every line (ioapic_quiets=): a level line nobody deasserts would otherwise
 * re-interrupt it after each EOI.
 *
 * Each CPU alternates calm and chaos phases. In a calm phase its APIC is enabled in a
 * known mode and it is "receptive": it takes part in the counted IPIs. Those use the
 * token discipline of ipi_stress.c (DESIGN.md): a sender claims the (target, vector)
 * token, checks that the target is receptive, then sends; the target's handler returns
 * the token just before EOI, so sent == received exactly and a token that never comes
 * back is a lost interrupt. Before a chaos phase a CPU closes (receptive = 0) and waits
 * until every token aimed at it came back; in chaos it may disable its APIC, change its
 * ID (never to another CPU's: a counted IPI to that CPU would reach both), software-
 * disable it, and switch modes; a calm phase starts with a reset to a known state. Random IPIs never use the counted vectors (0x40-0x4f), and never INIT (turned
 * into INIT level de-assert: an INIT would reset a CPU into wait-for-SIPI, and the BSP
 * has no firmware to restart in), so they cannot invent or destroy counted interrupts.
 *
 * initsipi=1: now and then the BSP asks an AP to park (it drains its tokens, resets its
 * APIC to xAPIC so that an INIT reaches it, and spins with interrupts off), sends it INIT
 * (into wait-for-SIPI) and SIPI to fz_tramp at RESTART_PAGE, which finds the CPU's index
 * by its APIC ID and resumes its loop where it stopped (resets=). Random SIPIs then point
 * at the same page, and no NMI is sent at all: an NMI landing in the real-mode trampoline
 * (no IDT yet) would crash the guest by the guest's own fault.
 *
 * Faults: every fuzzed instruction runs inside a recovery window (per CPU): an exception
 * there resumes after the instruction and is counted (gp=, other_faults=). An exception
 * outside a window is unexpected: it is printed and the guest exits with 3. NMIs do not
 * use the window (the runtime's wrmsr_safe would mistake an NMI for a fault; this file
 * has its own helpers). The runtime returns from interrupts without IRET, so a CPU takes
 * at most one NMI.
 *
 * The end of a run: a CPU whose quota is done resets its APIC (timers off) and, an AP,
 * halts with interrupts on, so the IPIs of CPUs still fuzzing reach it. When all are
 * done the BSP closes the run: it sets `closing` and sends CLOSE_VECTOR to all but
 * itself; each AP takes it, disables interrupts for good and acknowledges (closed=).
 * Only then does the BSP, interrupts off too, add up the counters: no interrupt can be
 * injected into a CPU with IF=0, and one kvmpy injected before a CLI was delivered
 * before it (KVM delivers a queued interrupt at the next entry, before any instruction),
 * so "interrupts" is every interrupt kvmpy injected, the runner's exact check (without
 * the close, an IPI or I/O APIC interrupt still on its way to a halted AP was handled
 * after the sum: kvmpy counted 1-4 more than the guests).
 *
 * Output (CPU 0): "fuzz: seed=.. cpus=.. mode=.. ops=..", counters as key=value lines,
 * the interrupts each CPU handled by initial APIC ID ("fuzz: handled apic0=.. apic1=.."),
 * "fuzz: lost=L invented=I" and "fuzz: done" with exit 0; exit 1 if a counted IPI was
 * lost or invented, an oracle (APIC base rules, all-ones reads) failed, or an AP did
 * not acknowledge the close.
 */
#include "apic.h"

#define MAX_CPUS 8
#define TOK_BASE 0x40
#define NTOK 16
#define XAPIC_DEFAULT_BASE 0xfee00000u
#define MMIO_FUZZ_LO 0xd0000000u
#define MMIO_FUZZ_HI 0xfec00000u
#define BURST_MAX 24            /* interrupts within one op before the timer is stopped */
#define DRAIN_POLLS 50000       /* ~5 s: only a lost token waits this out */
#define GP 13
#define RESTART_PAGE 0x4000u    /* initsipi=1: SIPI vector 4 restarts a CPU in fz_tramp */
#define RESTART_POLLS 200000
#define CLOSE_VECTOR 0xfe      /* the BSP's "stop taking interrupts" IPI at the end */
#define CLOSE_TRIES 3
#define IOAPIC_BASE 0xfec00000u
#define IOAPIC_PINS 24
#define TESTDEV_IRQ 0x2000
#define RTE_DS (1u << 12)
#define RTE_REMOTE_IRR (1u << 14)
#define RTE_LEVEL (1u << 15)
#define RTE_MASKED (1u << 16)

enum { M_DISABLED = 0, M_XAPIC = 1, M_X2APIC = 2 };

struct cpu_state {
    volatile u32 rec;       /* recovery EIP of the open window, 0 if none */
    volatile u32 fault;     /* the vector a window's instruction raised, 0 if none */
    u32 mode;               /* APIC mode as this CPU last set it (cli around changes) */
    u32 base;               /* xAPIC base, low 32 bits */
    u32 base_hi;
    u32 rng;
    u32 burst;              /* interrupts since the current op began */
    u32 calm_left, chaos_left;
    /* counters */
    u32 ops, gp, other_faults, irqs, nmis, spurious, storms;
    u32 tok_sent, tok_busy, tok_refused, send_faults, drain_timeouts;
    u32 base_writes, base_mismatch, hole_bad, mmio_bad, restore_faults;
    u32 msr_rd, msr_wr, mmio_rd, mmio_wr, pio, pio_str, icr_random, timer_ops;
    u32 phases, done, resets, restart_timeouts;
    u32 io_ops, io_bad, io_lines, io_quiets;
    u32 close_timeouts;
    u8 iobuf[64];
} __attribute__((aligned(64)));

static struct cpu_state cs[MAX_CPUS];
static volatile u32 token[MAX_CPUS][NTOK];
static volatile u32 receptive[MAX_CPUS];
static volatile u32 received[MAX_CPUS][NTOK];
static u32 sent[MAX_CPUS][MAX_CPUS][NTOK];     /* [sender][target][vector] */
u32 fz_ids[MAX_CPUS];      /* APIC ID of each CPU index (the restart trampoline reads it) */
#define ids fz_ids
static u32 ncpus, quota, seed, calm_mode, maxphyaddr;
static volatile u32 go, finished, unexpected, closing, closed;
static u32 initsipi;
static volatile u32 park_req[MAX_CPUS];    /* 1: the BSP asks; 2: finished, no more */
static volatile u32 parked[MAX_CPUS];

/* ------------------------------------------------------------------ helpers */

static inline u32 xorshift(u32 *s)
{
    u32 x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static inline struct cpu_state *me(void) { return &cs[cpu_index()]; }

static inline int claim(volatile u32 *t)
{
    u32 old = 0;
    asm volatile("lock cmpxchgl %2, %1" : "+a"(old), "+m"(*t) : "r"(1u) : "memory");
    return old == 0;
}

/* A recovery window: `insn` runs with st->rec = the address after it; a fault there
 * resumes at that address with st->fault = the vector (on_exception). */
#define WINDOW_BEGIN "movl $1f, %[rec]\n\t"
#define WINDOW_END "\n1:\tmovl $0, %[rec]"

static int fz_wrmsr(struct cpu_state *st, u32 msr, u64 val)
{
    st->fault = 0;
    asm volatile(WINDOW_BEGIN "wrmsr" WINDOW_END
                 : [rec] "=m"(st->rec)
                 : "c"(msr), "a"((u32)val), "d"((u32)(val >> 32))
                 : "memory");
    return st->fault;
}

static int fz_rdmsr(struct cpu_state *st, u32 msr, u64 *val)
{
    u32 lo = 0, hi = 0;

    st->fault = 0;
    asm volatile(WINDOW_BEGIN "rdmsr" WINDOW_END
                 : [rec] "=m"(st->rec), "+a"(lo), "+d"(hi)
                 : "c"(msr)
                 : "memory");
    *val = ((u64)hi << 32) | lo;
    return st->fault;
}

static u32 fz_mmio_read(struct cpu_state *st, u32 addr, u32 size)
{
    u32 v = 0xdeadbeef;

    st->fault = 0;
    if (size == 1)
        asm volatile(WINDOW_BEGIN "movzbl (%[a]), %[v]" WINDOW_END
                     : [rec] "=m"(st->rec), [v] "+r"(v) : [a] "r"(addr) : "memory");
    else if (size == 2)
        asm volatile(WINDOW_BEGIN "movzwl (%[a]), %[v]" WINDOW_END
                     : [rec] "=m"(st->rec), [v] "+r"(v) : [a] "r"(addr) : "memory");
    else
        asm volatile(WINDOW_BEGIN "movl (%[a]), %[v]" WINDOW_END
                     : [rec] "=m"(st->rec), [v] "+r"(v) : [a] "r"(addr) : "memory");
    return v;
}

static void fz_mmio_write(struct cpu_state *st, u32 addr, u32 size, u32 v)
{
    st->fault = 0;
    if (size == 1)
        asm volatile(WINDOW_BEGIN "movb %b[v], (%[a])" WINDOW_END
                     : [rec] "=m"(st->rec) : [a] "r"(addr), [v] "q"(v) : "memory");
    else if (size == 2)
        asm volatile(WINDOW_BEGIN "movw %w[v], (%[a])" WINDOW_END
                     : [rec] "=m"(st->rec) : [a] "r"(addr), [v] "r"(v) : "memory");
    else
        asm volatile(WINDOW_BEGIN "movl %[v], (%[a])" WINDOW_END
                     : [rec] "=m"(st->rec) : [a] "r"(addr), [v] "r"(v) : "memory");
}

static u32 fz_in(struct cpu_state *st, u16 port, u32 size)
{
    u32 v = 0;

    st->fault = 0;
    if (size == 1)
        asm volatile(WINDOW_BEGIN "inb %%dx, %%al" WINDOW_END
                     : [rec] "=m"(st->rec), "+a"(v) : "d"(port) : "memory");
    else if (size == 2)
        asm volatile(WINDOW_BEGIN "inw %%dx, %%ax" WINDOW_END
                     : [rec] "=m"(st->rec), "+a"(v) : "d"(port) : "memory");
    else
        asm volatile(WINDOW_BEGIN "inl %%dx, %%eax" WINDOW_END
                     : [rec] "=m"(st->rec), "+a"(v) : "d"(port) : "memory");
    return v;
}

static void fz_out(struct cpu_state *st, u16 port, u32 size, u32 v)
{
    st->fault = 0;
    if (size == 1)
        asm volatile(WINDOW_BEGIN "outb %%al, %%dx" WINDOW_END
                     : [rec] "=m"(st->rec) : "a"(v), "d"(port) : "memory");
    else if (size == 2)
        asm volatile(WINDOW_BEGIN "outw %%ax, %%dx" WINDOW_END
                     : [rec] "=m"(st->rec) : "a"(v), "d"(port) : "memory");
    else
        asm volatile(WINDOW_BEGIN "outl %%eax, %%dx" WINDOW_END
                     : [rec] "=m"(st->rec) : "a"(v), "d"(port) : "memory");
}

/* REP INS/OUTS of `count` items of `size` bytes at port (string I/O: one exit, count > 1). */
static void fz_string_io(struct cpu_state *st, u16 port, u32 size, u32 count, int out)
{
    u32 c = count;
    void *p = st->iobuf;

    st->fault = 0;
    if (out) {
        if (size == 1)
            asm volatile(WINDOW_BEGIN "rep outsb" WINDOW_END
                         : [rec] "=m"(st->rec), "+c"(c), "+S"(p) : "d"(port) : "memory");
        else if (size == 2)
            asm volatile(WINDOW_BEGIN "rep outsw" WINDOW_END
                         : [rec] "=m"(st->rec), "+c"(c), "+S"(p) : "d"(port) : "memory");
        else
            asm volatile(WINDOW_BEGIN "rep outsl" WINDOW_END
                         : [rec] "=m"(st->rec), "+c"(c), "+S"(p) : "d"(port) : "memory");
    } else {
        if (size == 1)
            asm volatile(WINDOW_BEGIN "rep insb" WINDOW_END
                         : [rec] "=m"(st->rec), "+c"(c), "+D"(p) : "d"(port) : "memory");
        else if (size == 2)
            asm volatile(WINDOW_BEGIN "rep insw" WINDOW_END
                         : [rec] "=m"(st->rec), "+c"(c), "+D"(p) : "d"(port) : "memory");
        else
            asm volatile(WINDOW_BEGIN "rep insl" WINDOW_END
                         : [rec] "=m"(st->rec), "+c"(c), "+D"(p) : "d"(port) : "memory");
    }
}

static void count_fault(struct cpu_state *st)
{
    if (st->fault == GP)
        st->gp++;
    else if (st->fault)
        st->other_faults++;
}

/* ------------------------------------------------------------------ APIC access by mode */

static inline int xapic_accessible(struct cpu_state *st)
{
    return !st->base_hi && ((st->base >= MMIO_FUZZ_LO && st->base < MMIO_FUZZ_HI)
                            || st->base == XAPIC_DEFAULT_BASE);
}

/* A register of this CPU's APIC in its current mode; 0 (and nothing done) when disabled
 * or when the xAPIC page lies where it cannot be reached (RAM, above 4 GiB). */
static u32 reg_read(struct cpu_state *st, u32 reg)
{
    u64 v;

    if (st->mode == M_X2APIC) {
        fz_rdmsr(st, X2APIC_MSR(reg), &v);
        return (u32)v;
    }
    if (st->mode == M_XAPIC && xapic_accessible(st))
        return fz_mmio_read(st, st->base + reg, 4);
    return 0;
}

static void reg_write(struct cpu_state *st, u32 reg, u32 val)
{
    if (st->mode == M_X2APIC)
        fz_wrmsr(st, X2APIC_MSR(reg), val);
    else if (st->mode == M_XAPIC && xapic_accessible(st))
        fz_mmio_write(st, st->base + reg, 4, val);
}

/* ------------------------------------------------------------------ handlers */

static void on_exception(struct frame *f)
{
    struct cpu_state *st = me();

    if (st->rec) {
        f->eip = st->rec;
        st->rec = 0;
        st->fault = f->vector;
        return;
    }
    __atomic_fetch_add(&unexpected, 1, __ATOMIC_SEQ_CST);
    printf("fuzz: unexpected exception %u error %x at eip %08x on cpu %u\n", f->vector,
           f->error_code, f->eip, cpu_index());
    exit(3);
}

static void on_nmi(struct frame *f)
{
    (void)f;
    me()->nmis++;
}

/* Stops this CPU's timer: an interrupt storm (a short periodic timer) would starve the
 * fuzz loop, which makes progress of about one instruction per interrupt. */
static void stop_timer(struct cpu_state *st)
{
    reg_write(st, APIC_TIMER_INITIAL, 0);
    reg_write(st, APIC_LVT_TIMER, APIC_LVT_MASKED);
    fz_wrmsr(st, MSR_IA32_TSC_DEADLINE, 0);
    st->storms++;
}

static void ioapic_quiet(struct cpu_state *st);

/* Vectors 16-255 other than the counted ones: count; EOI only if the vector is in
 * service (a spurious interrupt sets no ISR bit and must not be EOI'd, SDM 10.9). */
static void on_interrupt(struct frame *f)
{
    struct cpu_state *st = me();
    u32 rec = st->rec, fault = st->fault, v = f->vector;

    st->irqs++;
    if (st->mode != M_DISABLED) {
        u32 isr = reg_read(st, APIC_ISR + (v >> 5) * 0x10);
        if (!st->fault && (isr >> (v & 31)) & 1)
            reg_write(st, APIC_EOI, 0);
        else
            st->spurious++;
    }
    if (++st->burst > BURST_MAX) {
        stop_timer(st);
        ioapic_quiet(st);
        st->burst = 0;
    }
    st->fault = fault;
    st->rec = rec;
}

/* The counted vectors: count, return the token just before EOI. */
static void on_token(struct frame *f)
{
    struct cpu_state *st = me();
    u32 rec = st->rec, fault = st->fault, cpu = cpu_index();
    u32 v = f->vector - TOK_BASE;

    st->irqs++;
    received[cpu][v]++;
    token[cpu][v] = 0;
    reg_write(st, APIC_EOI, 0);
    st->fault = fault;
    st->rec = rec;
}

/* ------------------------------------------------------------------ value filters */

/* Vectors random sources may use: never a counted one, and never 17, 21, 29 or 30 (the
 * runtime's stubs expect the CPU to push an error code on those, which an external
 * interrupt does not). Illegal vectors 0-15 stay: they are the point. */
static u32 fv(u32 v)
{
    v &= 0xff;
    if (v >= TOK_BASE && v < TOK_BASE + NTOK)
        return v + 0x20;
    if (v == 17 || v == 21 || v == 29 || v == 30)
        return v | 0x80;
    return v;
}

/* A random ICR low word made harmless for the counts: fixed/lowest vectors filtered,
 * INIT turned into INIT level de-assert (no reset). */
static u32 filter_icr(u32 low)
{
    u32 dm = (low >> 8) & 7;

    if (dm <= 1)
        low = (low & ~0xffu) | fv(low);
    if (dm == 5)
        low = (low & ~APIC_INT_ASSERT) | APIC_INT_LEVELTRIG;
    if (initsipi && dm == 6)
        low = (low & ~0xffu) | (RESTART_PAGE >> 12);    /* a SIPI may restart a CPU */
    if (initsipi && dm == 4)
        low = (low & ~0x7ffu) | fv(low);    /* no NMIs: one could hit a restart trampoline */
    return low;
}

static u32 filter_lvt(u32 val) { return (val & ~0xffu) | fv(val); }

/* An xAPIC ID register value (ID in bits 31:24) that no other CPU has. A physical IPI
 * to an ID two APICs share reaches both (SDM 10.6.2.1; kvmpy and KVM deliver to every
 * match), so a counted IPI to the other CPU would also reach this one, uncounted: an
 * invented IPI by the guest's own doing. */
static u32 unaliased_id(u32 v)
{
    u32 cpu = cpu_index();

    for (u32 c = 0; c < ncpus; c++)
        if (c != cpu && (v >> 24) == ids[c]) {
            v += 1u << 24;
            c = -1u;                        /* again from the first CPU */
        }
    return v;
}

/* A write of `val` to APIC register `reg` made safe for this phase: calm phases keep
 * the APIC software-enabled and the xAPIC ID unchanged; in chaos the ID may change,
 * but never to another CPU's. Returns 0 to skip it. */
static int filter_reg_write(u32 reg, u32 *val, int calm)
{
    if (reg == APIC_ICR)
        *val = filter_icr(*val);
    else if (reg >= APIC_LVT_TIMER && reg <= APIC_LVT_ERROR)
        *val = filter_lvt(*val);
    else if (reg == APIC_SELF_IPI)
        *val = (*val & ~0xffu) | fv(*val);
    else if (reg == APIC_SVR && calm)
        *val |= APIC_SVR_ENABLE;
    else if (reg == APIC_ID && calm)
        return 0;
    else if (reg == APIC_ID)
        *val = unaliased_id(*val);
    return 1;
}

/* ------------------------------------------------------------------ IA32_APIC_BASE */

static u32 mode_of(u64 v)
{
    if (!(v & APIC_BASE_EN))
        return M_DISABLED;
    return (v & APIC_BASE_EXTD) ? M_X2APIC : M_XAPIC;
}

/* Would this write #GP (SDM 10.4.4 reserved bits, 10.12.5 transitions)? */
static int base_write_faults(u32 cur, u64 v)
{
    u64 reserved = 0x2ffull | ~((1ull << maxphyaddr) - 1);
    u32 new = mode_of(v);

    if (v & reserved)
        return 1;
    if (!(v & APIC_BASE_EN) && (v & APIC_BASE_EXTD))
        return 1;
    if ((cur == M_X2APIC && new == M_XAPIC) || (cur == M_DISABLED && new == M_X2APIC))
        return 1;
    return 0;
}

/* Writes IA32_APIC_BASE with interrupts off (the handlers use the tracked mode), checks
 * the outcome against the SDM and the value read back. */
static int write_base(struct cpu_state *st, u64 v)
{
    u32 flags = read_eflags();
    int expect, fault;
    u64 back;

    cli();
    expect = base_write_faults(st->mode, v);
    fault = fz_wrmsr(st, MSR_IA32_APIC_BASE, v);
    st->base_writes++;
    if (!fault) {
        st->mode = mode_of(v);
        st->base = (u32)v & APIC_BASE_ADDR_MASK;
        st->base_hi = (u32)(v >> 32);
        if (fz_rdmsr(st, MSR_IA32_APIC_BASE, &back) || ((back ^ v) & ~0x1ffull))
            st->base_mismatch++;
    }
    if (!!fault != expect)
        st->base_mismatch++;
    if (flags & (1u << 9))
        sti();
    return fault;
}

static u32 random_base_addr(struct cpu_state *st, u32 r)
{
    switch (r & 7) {
    case 0: case 1: case 2:
        return st->base;
    case 3: case 4:
        return XAPIC_DEFAULT_BASE;
    case 5: case 6:
        return MMIO_FUZZ_LO + ((r >> 8) % ((MMIO_FUZZ_HI - MMIO_FUZZ_LO) >> 12) << 12);
    default:
        return ((r >> 8) & 0x3fff) << 12;   /* in RAM: legal, unreachable as MMIO */
    }
}

/* Back to a known state: disabled, then enabled in `mode` at `addr`, SVR enabled with
 * spurious vector 0xff, TPR 0. Disabling resets every register (SDM 10.4.3). */
static void reset_apic(struct cpu_state *st, u32 mode, u32 addr)
{
    int bad = 0;

    if (st->mode != M_DISABLED)
        bad |= write_base(st, addr);
    bad |= write_base(st, addr | APIC_BASE_EN);
    if (mode == M_X2APIC)
        bad |= write_base(st, addr | APIC_BASE_EN | APIC_BASE_EXTD);
    reg_write(st, APIC_SVR, APIC_SVR_ENABLE | APIC_SPURIOUS_VECTOR);
    reg_write(st, APIC_TPR, 0);
    if (bad)
        st->restore_faults++;
}

/* ------------------------------------------------------------------ phases */

static void open_calm(struct cpu_state *st, u32 cpu)
{
    u32 r = xorshift(&st->rng);
    u32 mode = calm_mode == 3 ? 1 + (r & 1) : calm_mode;
    u32 addr = (r & 0x300) ? XAPIC_DEFAULT_BASE
               : MMIO_FUZZ_LO + ((r >> 12) % ((MMIO_FUZZ_HI - MMIO_FUZZ_LO) >> 12) << 12);

    reset_apic(st, mode, addr);
    st->calm_left = 20 + (r >> 24) % 80;
    st->phases++;
    __atomic_store_n(&receptive[cpu], 1, __ATOMIC_SEQ_CST);
}

/* Leaves the calm phase: no new counted IPI may target this CPU, and every one already
 * sent must arrive (TPR 0 and IF=1 so it can). */
static void close_calm(struct cpu_state *st, u32 cpu)
{
    u32 out = 1;

    __atomic_store_n(&receptive[cpu], 0, __ATOMIC_SEQ_CST);
    reg_write(st, APIC_TPR, 0);
    sti();
    for (u32 i = 0; i < DRAIN_POLLS && out; i++) {
        out = 0;
        for (u32 v = 0; v < NTOK; v++)
            out |= token[cpu][v];
        if (out)
            pause();
    }
    if (out && !st->drain_timeouts++) {
        printf("fuzz: cpu %u drain timeout: mode %u base %x tokens %x eflags %x svr %x tpr %x ppr %x"
               " irr2 %x isr", cpu, st->mode, st->base, out, read_eflags(), reg_read(st, APIC_SVR),
               reg_read(st, APIC_TPR), reg_read(st, APIC_PPR), reg_read(st, APIC_IRR + 0x20));
        for (u32 w = 0; w < 8; w++)
            printf(" %x", reg_read(st, APIC_ISR + w * 0x10));
        printf("\n");
    }
    st->chaos_left = 5 + xorshift(&st->rng) % 25;
}

/* ------------------------------------------------------------------ operations */

static void op_x2apic_msr(struct cpu_state *st, u32 r, int calm)
{
    u32 msr = 0x800 + ((r >> 8) & 0xff);
    u64 v;

    if (r & 0x10000) {
        fz_rdmsr(st, msr, &v);
        st->msr_rd++;
    } else {
        u32 lo = xorshift(&st->rng), hi = 0;
        u32 reg = (msr - 0x800) << 4;
        if ((r & 0x60000) == 0)
            hi = xorshift(&st->rng);        /* high bits: reserved except in the ICR */
        else if ((r & 0x60000) == 0x20000)
            lo &= 0xff;
        if (reg == APIC_ICR)
            hi = ids[hi % ncpus] | (r & 0x80000 ? 0xffffffffu : 0);
        if (!filter_reg_write(reg, &lo, calm))
            return;
        fz_wrmsr(st, msr, ((u64)hi << 32) | lo);
        st->msr_wr++;
    }
    count_fault(st);
}

static void op_apic_base(struct cpu_state *st, u32 r, int calm)
{
    u64 cur = (u64)st->base_hi << 32 | st->base
              | (st->mode ? APIC_BASE_EN : 0) | (st->mode == M_X2APIC ? APIC_BASE_EXTD : 0);
    u64 v;

    if (calm) {
        /* Only writes that leave the mode alone: the same value, a reserved bit (#GP),
         * or an invalid transition (#GP). */
        switch ((r >> 8) & 3) {
        case 0:
            v = cur;
            break;
        case 1: {
            u32 bit = (r >> 16) & 63;
            if (bit >= 10 && bit < maxphyaddr)
                bit = 9;                        /* never EN/EXTD or an address bit */
            v = cur | (1ull << bit);
            break;
        }
        case 2:
            v = (cur & ~(u64)APIC_BASE_EN) | APIC_BASE_EXTD;
            break;
        default:
            v = st->mode == M_X2APIC ? cur & ~(u64)APIC_BASE_EXTD : cur | (1ull << 9);
        }
        if (v == cur && (r & 0x400))
            v |= APIC_BASE_BSP;                 /* read-only, ignored */
    } else {
        v = random_base_addr(st, r >> 8);
        v |= (u64)((r >> 16) & 3) << 10;        /* EN, EXTD: all four combinations */
        if ((r & 0xf00000) == 0)
            v |= 1ull << ((r >> 24) & 63);      /* a random bit, often reserved */
        if ((r & 0xf00000) == 0x100000)
            v |= (u64)(xorshift(&st->rng) & 0xff) << 32;    /* above 4 GiB */
    }
    write_base(st, v);
    count_fault(st);
}

static void op_tsc_deadline(struct cpu_state *st, u32 r)
{
    u64 v;

    switch ((r >> 8) & 3) {
    case 0:
        fz_rdmsr(st, MSR_IA32_TSC_DEADLINE, &v);
        break;
    case 1:
        fz_wrmsr(st, MSR_IA32_TSC_DEADLINE, rdtsc() + ((r >> 12) & 0xfffff));
        break;
    case 2:
        fz_wrmsr(st, MSR_IA32_TSC_DEADLINE, (u64)xorshift(&st->rng) << 32 | r);
        break;
    default:
        fz_wrmsr(st, MSR_IA32_TSC_DEADLINE, r & 1 ? 0 : 1);  /* disarm, or long past */
    }
    st->timer_ops++;
    count_fault(st);
}

static void op_xapic_page(struct cpu_state *st, u32 r, int calm)
{
    u32 size = 1u << ((r >> 8) % 3);
    u32 off = (r >> 12) & (0x1000 - size);
    u32 addr = st->base + off;

    if (!xapic_accessible(st))
        return;
    if (st->mode != M_XAPIC) {
        /* Not decoded outside xAPIC mode: reads float high. */
        u32 v = fz_mmio_read(st, addr, size);
        if (v != (size == 4 ? 0xffffffffu : (1u << (8 * size)) - 1))
            st->hole_bad++;
        st->mmio_rd++;
        return;
    }
    if (r & 0x80) {
        fz_mmio_read(st, addr, size);
        st->mmio_rd++;
    } else {
        u32 v = xorshift(&st->rng);
        if (r & 0x40)
            off = (r >> 12) & 0x3f0, addr = st->base + off, size = 4;  /* a register */
        if (size == 4 && !(off & 0xf) && !filter_reg_write(off, &v, calm))
            return;
        fz_mmio_write(st, addr, size, v);
        st->mmio_wr++;
    }
    count_fault(st);
}

static u16 random_port(u32 r)
{
    u16 port = r & 0xffff;

    if ((r >> 16) & 1)
        port &= 0x3ff;                          /* the legacy ISA range, more devices */
    if ((port >= 0xf0 && port < 0xf8) || (port >= 0x3f0 && port < 0x400)
        || (port & ~0x81) == 0x20 || (port & ~1) == 0x4d0)
        port ^= 0x100;                          /* never the exit port, never COM1, */
                                                /* never the PICs (the timer's IRQ 0) */
    return port;
}

static void op_port(struct cpu_state *st, u32 r)
{
    u32 r2 = xorshift(&st->rng);
    u16 port = random_port(r2);
    u32 size = 1u << ((r >> 8) % 3);

    if ((r >> 10) & 7) {
        if (r & 0x8000)
            fz_out(st, port, size, xorshift(&st->rng));
        else
            fz_in(st, port, size);
        st->pio++;
    } else {
        fz_string_io(st, port, size, 1 + ((r >> 16) & 7), r & 0x8000);
        st->pio_str++;
    }
    count_fault(st);
}

static void op_mmio(struct cpu_state *st, u32 r)
{
    u32 size = 1u << ((r >> 8) % 3);
    u32 addr = MMIO_FUZZ_LO + (xorshift(&st->rng) % (MMIO_FUZZ_HI - MMIO_FUZZ_LO));

    addr &= ~(size - 1);
    if (st->mode == M_XAPIC && (addr & ~0xfffu) == st->base)
        return;                                 /* our own APIC page */
    if (r & 0x800) {
        u32 v = fz_mmio_read(st, addr, size);
        if (v != (size == 4 ? 0xffffffffu : (1u << (8 * size)) - 1))
            st->mmio_bad++;
        st->mmio_rd++;
    } else {
        fz_mmio_write(st, addr, size, xorshift(&st->rng));
        st->mmio_wr++;
    }
    count_fault(st);
}

/* An ICR write in this CPU's mode: x2APIC one 64-bit WRMSR, xAPIC ICR high then low. */
static void send_icr(struct cpu_state *st, u32 low, u32 dest)
{
    if (st->mode == M_X2APIC) {
        fz_wrmsr(st, X2APIC_MSR(APIC_ICR), ((u64)dest << 32) | low);
    } else if (st->mode == M_XAPIC && xapic_accessible(st)) {
        fz_mmio_write(st, st->base + APIC_ICR2, 4, dest << 24);
        fz_mmio_write(st, st->base + APIC_ICR, 4, low);
    }
}

static void op_icr(struct cpu_state *st, u32 r)
{
    u32 low = filter_icr(xorshift(&st->rng));
    u32 dest;

    switch ((r >> 8) & 3) {
    case 0:
        dest = ids[(r >> 12) % ncpus];
        break;
    case 1:
        dest = st->mode == M_X2APIC ? 0xffffffffu : 0xff;
        break;
    case 2:
        dest = (r >> 12) & 0xff;
        break;
    default:
        dest = xorshift(&st->rng);
    }
    if (r & 0x10000)
        low &= 0x000fffff;                      /* no reserved bits: it must not #GP */
    send_icr(st, low, dest);
    st->icr_random++;
    count_fault(st);
}

static void op_nmi(struct cpu_state *st, u32 r)
{
    static const u32 shorthand[4] = {0, APIC_DEST_SELF, APIC_DEST_ALLINC, APIC_DEST_ALLBUT};

    if (initsipi)
        return;

    send_icr(st, APIC_DM_NMI | APIC_INT_ASSERT | shorthand[(r >> 8) & 3],
             ids[(r >> 12) % ncpus]);
    count_fault(st);
}

static void op_self_ipi(struct cpu_state *st, u32 r)
{
    u32 v = fv(r >> 8);

    if (st->mode == M_X2APIC && (r & 0x10000))
        fz_wrmsr(st, X2APIC_MSR(APIC_SELF_IPI), v);
    else
        send_icr(st, APIC_DEST_SELF | APIC_INT_ASSERT | v, 0);
    count_fault(st);
}

static void op_timer(struct cpu_state *st, u32 r)
{
    static const u32 modes[4] = {APIC_TIMER_ONESHOT, APIC_TIMER_PERIODIC,
                                 APIC_TIMER_TSC_DEADLINE, 3u << 17};
    u32 lvt = fv(0x20 + ((r >> 8) & 0xdf)) | modes[(r >> 16) & 3];

    if ((r & 0xf000000) == 0)
        lvt |= APIC_LVT_MASKED;
    reg_write(st, APIC_TIMER_DIVIDE, (r >> 20) & 0xf);
    reg_write(st, APIC_LVT_TIMER, lvt);
    if (((r >> 16) & 3) == 2)
        fz_wrmsr(st, MSR_IA32_TSC_DEADLINE, rdtsc() + ((r >> 8) & 0xffff));
    else
        reg_write(st, APIC_TIMER_INITIAL, 1 + (xorshift(&st->rng) & 0x3ffff));
    if (r & 0x80)
        reg_write(st, APIC_LVT_ERROR, fv(r >> 24) | (r & 0x40 ? APIC_LVT_MASKED : 0));
    st->timer_ops++;
    count_fault(st);
}

static void op_tpr(struct cpu_state *st, u32 r)
{
    reg_write(st, APIC_TPR, (r & 0x700) ? (r >> 12) & 0x3f : (r >> 12) & 0xff);
    count_fault(st);
}

static void op_other_msr(struct cpu_state *st, u32 r)
{
    static const u32 bases[4] = {0x0, 0x800, 0xc0000000u, 0xc0010000u};
    u64 v;

    fz_rdmsr(st, bases[(r >> 8) & 3] + ((r >> 12) & 0x1fff), &v);
    st->msr_rd++;
    count_fault(st);
}

/* Chaos only: the registers that take a CPU out of the counted IPIs: SVR (software
 * disable, focus bit, spurious vector), the xAPIC ID, LDR and DFR. */
static void op_identity(struct cpu_state *st, u32 r)
{
    static const u32 regs[4] = {APIC_SVR, APIC_ID, APIC_LDR, APIC_DFR};
    u32 reg = regs[(r >> 8) & 3], v = xorshift(&st->rng);

    if (reg == APIC_SVR)
        v &= 0x3ff;
    else if (reg == APIC_ID)
        v = unaliased_id(v);
    reg_write(st, reg, v);
    st->msr_wr++;
    count_fault(st);
}

/* A counted IPI (calm phase only): fixed physical, self shorthand, SELF_IPI MSR, or a
 * broadcast; tokens first, then the receptive check, then the send. */
static void op_token(struct cpu_state *st, u32 cpu, u32 r)
{
    u32 v = (r >> 8) % NTOK, kind = (r >> 12) & 7, t = (r >> 16) % ncpus;
    u32 all = (1u << ncpus) - 1, mask, low = APIC_DM_FIXED | APIC_INT_ASSERT | (TOK_BASE + v);
    u32 dest = 0, use_msr = 0;

    if (kind <= 3) {
        mask = 1u << t;
        dest = ids[t];
    } else if (kind == 4) {
        mask = 1u << cpu;
        low |= APIC_DEST_SELF;
    } else if (kind == 5) {
        mask = 1u << cpu;
        use_msr = st->mode == M_X2APIC;
        if (!use_msr)
            low |= APIC_DEST_SELF;
    } else if (kind == 6) {
        mask = all;
        if (r & 0x1000000)
            low |= APIC_DEST_ALLINC;
        else
            dest = st->mode == M_X2APIC ? 0xffffffffu : 0xff;
    } else {
        mask = all & ~(1u << cpu);
        low |= APIC_DEST_ALLBUT;
        if (!mask)
            return;
    }
    for (u32 u = 0; u < ncpus; u++) {
        if (!(mask & (1u << u)))
            continue;
        if (!claim(&token[u][v])) {
            for (u32 w = 0; w < u; w++)
                if (mask & (1u << w))
                    token[w][v] = 0;
            st->tok_busy++;
            return;
        }
    }
    for (u32 u = 0; u < ncpus; u++) {
        if ((mask & (1u << u)) && !__atomic_load_n(&receptive[u], __ATOMIC_SEQ_CST)) {
            for (u32 w = 0; w < ncpus; w++)
                if (mask & (1u << w))
                    token[w][v] = 0;
            st->tok_refused++;
            return;
        }
    }
    for (u32 u = 0; u < ncpus; u++)
        if (mask & (1u << u))
            sent[cpu][u][v]++;
    if (use_msr)
        fz_wrmsr(st, X2APIC_MSR(APIC_SELF_IPI), TOK_BASE + v);
    else
        send_icr(st, low, dest);
    if (st->fault) {
        /* A valid ICR write must not fault: count it, and take the IPI back. */
        st->send_faults++;
        for (u32 u = 0; u < ncpus; u++)
            if (mask & (1u << u)) {
                sent[cpu][u][v]--;
                token[u][v] = 0;
            }
        return;
    }
    st->tok_sent++;
}

/* ------------------------------------------------------------------ the I/O APIC */

static struct spinlock io_lock;
static u32 io_sel, io_id;       /* what the guest last wrote: IOREGSEL, the ID field */

/* Interrupts off while holding io_lock: a handler may take it (ioapic_quiet). */
static u32 io_lock_irqsave(void)
{
    u32 flags = read_eflags();

    cli();
    spin_lock(&io_lock);
    return flags;
}

static void io_unlock_irqrestore(u32 flags)
{
    spin_unlock(&io_lock);
    if (flags & 0x200)
        sti();
}

static void io_select(struct cpu_state *st, u32 index)
{
    io_sel = index & 0xff;
    fz_mmio_write(st, IOAPIC_BASE, 4, index);
}

static u32 io_read_reg(struct cpu_state *st, u32 index)
{
    io_select(st, index);
    return fz_mmio_read(st, IOAPIC_BASE + 0x10, 4);
}

static void io_write_reg(struct cpu_state *st, u32 index, u32 v)
{
    io_select(st, index);
    fz_mmio_write(st, IOAPIC_BASE + 0x10, 4, v);
    if (index == 0)
        io_id = (v >> 24) & 0xf;
}

static void io_check(struct cpu_state *st, const char *what, u32 got, u32 want)
{
    if (got == want)
        return;
    if (!st->io_bad++)
        printf("fuzz: cpu %u ioapic %s: got %x expected %x\n", cpu_index(), what, got, want);
}

/* The value IOWIN must read for index `sel`, or 1 << 32 - 1 with *known = 0. */
static u32 io_expected(u32 sel, int *known)
{
    *known = 1;
    if (sel == 0 || sel == 2)
        return io_id << 24;
    if (sel == 1)
        return 0x00170020;
    if (sel >= 0x10 && sel < 0x10 + 2 * IOAPIC_PINS) {
        *known = 0;
        return 0;
    }
    return 0;   /* no register at this index */
}

/* A burst of interrupts: mask every entry, deassert every line. Any context. */
static void ioapic_quiet(struct cpu_state *st)
{
    u32 flags = io_lock_irqsave();

    for (u32 pin = 0; pin < IOAPIC_PINS; pin++) {
        io_write_reg(st, 0x10 + 2 * pin, RTE_MASKED);
        outb(TESTDEV_IRQ + pin, 0);
    }
    io_unlock_irqrestore(flags);
    st->io_quiets++;
}

/* A random redirection entry, made harmless for the counts and the CPUs: vectors
 * through fv() (no counted vector; illegal ones stay), INIT turned into fixed (an INIT
 * would reset a CPU into wait-for-SIPI), no NMI with initsipi=1. */
static void io_random_entry(struct cpu_state *st, u32 *lo, u32 *hi)
{
    u32 v = xorshift(&st->rng), dm = (v >> 8) & 7;

    if (dm == 5 || (initsipi && dm == 4))
        dm = 0;
    *lo = (v & ~0x7ffu) | dm << 8 | fv(v);
    if (v & 0x60000)
        *lo &= ~RTE_MASKED;                 /* mostly unmasked */
    *hi = xorshift(&st->rng);
    if (*hi & 0x100)
        *hi = (*hi & 0x00ffffffu) | ids[(*hi >> 9) % ncpus] << 24;
}

/* Mostly one of four pins (8-11), so lines meet programmed entries; now and then any. */
static u32 io_pin(u32 r, u32 limit)
{
    return (r >> 24) & 3 ? 8 + (r & 3) : r % limit;
}

static void op_ioapic(struct cpu_state *st, u32 r)
{
    u32 r2 = xorshift(&st->rng), flags, lo, hi, got, want, size, off, pin;
    int known;

    st->io_ops++;
    switch ((r >> 8) % 8) {
    case 0: case 1:                         /* a line, sometimes beyond the 24 */
        pin = io_pin(r2, IOAPIC_PINS + 2);
        size = (r2 >> 8) & 7 ? 1 : 1u << ((r2 >> 11) % 3);
        fz_out(st, TESTDEV_IRQ + pin, size, (r2 >> 16) & 1 ? (r2 >> 17) & 0xff : 0);
        st->io_lines++;
        break;
    case 2:                                 /* a random entry, halves in random order */
        pin = io_pin(r2, IOAPIC_PINS);
        io_random_entry(st, &lo, &hi);
        flags = io_lock_irqsave();
        if (r2 & 0x100) {
            io_write_reg(st, 0x11 + 2 * pin, hi);
            io_write_reg(st, 0x10 + 2 * pin, lo);
        } else {
            io_write_reg(st, 0x10 + 2 * pin, lo);
            io_write_reg(st, 0x11 + 2 * pin, hi);
        }
        got = io_read_reg(st, 0x10 + 2 * pin);
        io_check(st, "entry high half", io_read_reg(st, 0x11 + 2 * pin), hi);
        io_unlock_irqrestore(flags);
        io_check(st, "entry low half", got & ~(RTE_DS | RTE_REMOTE_IRR),
                 lo & ~(RTE_DS | RTE_REMOTE_IRR));
        io_check(st, "delivery status", got & RTE_DS, 0);
        if (!(got & RTE_LEVEL))
            io_check(st, "remote IRR of an edge entry", got & RTE_REMOTE_IRR, 0);
        break;
    case 3:                                 /* a raw read anywhere in the window */
        size = 1u << (r2 % 3);
        off = (r2 >> 4) & 0xfff & ~(size - 1);
        flags = io_lock_irqsave();
        got = fz_mmio_read(st, IOAPIC_BASE + off, size);
        want = 0;
        known = 1;
        if ((off & 0xff) == 0)
            want = io_sel;
        else if ((off & 0xff) == 0x10 && size == 4)
            want = io_expected(io_sel, &known);
        io_unlock_irqrestore(flags);
        if (known)
            io_check(st, "window read", got, want & (size == 4 ? ~0u : (1u << (8 * size)) - 1));
        st->mmio_rd++;
        break;
    case 4:                                 /* a raw write anywhere but IOWIN */
        size = 1u << (r2 % 3);
        off = (r2 >> 4) & 0xfff & ~(size - 1);
        if ((off & 0xff) == 0x10)
            off ^= 0x20;
        want = xorshift(&st->rng);
        flags = io_lock_irqsave();
        fz_mmio_write(st, IOAPIC_BASE + off, size, want);
        if ((off & 0xff) == 0)                      /* an IOREGSEL alias: 8 bits */
            io_sel = want & 0xff;
        io_unlock_irqrestore(flags);
        st->mmio_wr++;
        break;
    case 5:                                 /* ID, version, arbitration, no register */
        flags = io_lock_irqsave();
        io_write_reg(st, 0, r2);
        io_check(st, "ID", io_read_reg(st, 0), r2 & 0x0f000000);
        io_write_reg(st, 1, ~r2);
        io_check(st, "version", io_read_reg(st, 1), 0x00170020);
        io_write_reg(st, 2, r2 >> 3);
        io_check(st, "arbitration", io_read_reg(st, 2), r2 & 0x0f000000);
        off = (r2 >> 8) & 1 ? 3 + (r2 >> 9) % 13 : 0x40 + (r2 >> 9) % 0xc0;
        io_write_reg(st, off, xorshift(&st->rng));
        io_check(st, "no-register index", io_read_reg(st, off), 0);
        io_unlock_irqrestore(flags);
        break;
    case 6:                                 /* the EOI register, any vector, any size */
        size = (r2 >> 8) & 3 ? 4 : 1u << ((r2 >> 10) % 3);
        fz_mmio_write(st, IOAPIC_BASE + 0x40, size, r2 & 0xffff);
        st->mmio_wr++;
        break;
    default:                                /* an entry read back */
        pin = io_pin(r2, IOAPIC_PINS);
        flags = io_lock_irqsave();
        got = io_read_reg(st, 0x10 + 2 * pin);
        io_unlock_irqrestore(flags);
        io_check(st, "delivery status", got & RTE_DS, 0);
        if (!(got & RTE_LEVEL))
            io_check(st, "remote IRR of an edge entry", got & RTE_REMOTE_IRR, 0);
    }
    count_fault(st);
}

static void one_op(struct cpu_state *st, u32 cpu, int calm)
{
    u32 r = xorshift(&st->rng);

    st->burst = 0;
    switch (r % 22) {
    case 0: case 1: case 2:
        op_x2apic_msr(st, r, calm);
        break;
    case 3:
        op_apic_base(st, r, calm);
        break;
    case 4:
        op_tsc_deadline(st, r);
        break;
    case 5: case 6:
        op_xapic_page(st, r, calm);
        break;
    case 7: case 8:
        op_port(st, r);
        break;
    case 9:
        op_mmio(st, r);
        break;
    case 10: case 11:
        op_icr(st, r);
        break;
    case 12:
        op_nmi(st, r);
        break;
    case 13:
        op_self_ipi(st, r);
        break;
    case 14:
        op_timer(st, r);
        break;
    case 15:
        op_tpr(st, r);
        break;
    case 16:
        op_other_msr(st, r);
        break;
    case 17: case 18:
        op_ioapic(st, r);
        break;
    default:
        if (calm)
            op_token(st, cpu, r);
        else if (r & 0x100000)
            op_identity(st, r);
        else
            op_apic_base(st, r, 0);
    }
    st->ops++;
}

static void fuzz_loop(struct cpu_state *st, u32 cpu);
static void ap_idle(void) __attribute__((noreturn));

/* initsipi=1: this CPU stops taking part (tokens drained), leaves its APIC enabled in
 * xAPIC mode with its own ID (an INIT must reach it), and spins with interrupts off
 * until the BSP's INIT resets it and a SIPI restarts it in fz_tramp. */
static void park(struct cpu_state *st, u32 cpu) __attribute__((noreturn));
static void park(struct cpu_state *st, u32 cpu)
{
    if (st->calm_left)
        close_calm(st, cpu);
    reset_apic(st, M_XAPIC, XAPIC_DEFAULT_BASE);
    cli();
    __atomic_store_n(&parked[cpu], 1, __ATOMIC_SEQ_CST);
    for (;;)
        pause();
}

/* Called by fz_tramp on the restarted CPU's own stack: the loop goes on where it was. */
void fz_restart(u32 cpu) __attribute__((noreturn));
void fz_restart(u32 cpu)
{
    struct cpu_state *st = &cs[cpu];
    u64 base = rdmsr(MSR_IA32_APIC_BASE);

    kvmpy_load_idt();
    st->rec = 0;
    st->mode = mode_of(base);
    st->base = (u32)base & APIC_BASE_ADDR_MASK;
    st->base_hi = (u32)(base >> 32);
    st->resets++;
    st->calm_left = 0;
    st->chaos_left = 1;
    __atomic_store_n(&park_req[cpu], 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&parked[cpu], 0, __ATOMIC_SEQ_CST);
    sti();
    open_calm(st, cpu);
    fuzz_loop(st, cpu);
    ap_idle();
}

/* BSP, calm phase, initsipi=1: INIT and SIPI to a parked AP, which resumes its loop. */
static void op_reset_ap(struct cpu_state *st, u32 r)
{
    u32 t, i;

    if (ncpus < 2)
        return;
    t = 1 + r % (ncpus - 1);
    st->ops++;
    if (!claim(&park_req[t]))
        return;                                 /* finished already */
    for (i = 0; i < RESTART_POLLS && !parked[t]; i++)
        pause();
    if (!parked[t]) {
        st->restart_timeouts++;
        return;
    }
    send_icr(st, APIC_DM_INIT | APIC_INT_ASSERT, ids[t]);
    for (u32 k = 0; k < 2 && parked[t]; k++) {
        send_icr(st, APIC_DM_STARTUP | (RESTART_PAGE >> 12), ids[t]);
        for (i = 0; i < 100 && parked[t]; i++)
            pause();
    }
    for (i = 0; i < RESTART_POLLS && parked[t]; i++)
        pause();
    if (parked[t])
        st->restart_timeouts++;
}

static void fuzz_loop(struct cpu_state *st, u32 cpu)
{
    for (;;) {
        if (st->done >= quota) {
            u32 old = 0;
            asm volatile("lock cmpxchgl %2, %1" : "+a"(old), "+m"(park_req[cpu]) : "r"(2u)
                         : "memory");
            if (old == 1)
                park(st, cpu);
            break;
        }
        if (park_req[cpu] == 1)
            park(st, cpu);
        if (st->calm_left) {
            if (initsipi && cpu == 0 && (xorshift(&st->rng) & 63) == 0)
                op_reset_ap(st, st->rng);
            else
                one_op(st, cpu, 1);
            if (!--st->calm_left)
                close_calm(st, cpu);
        } else {
            one_op(st, cpu, 0);
            if (!--st->chaos_left)
                open_calm(st, cpu);
        }
        st->done++;
    }
    if (st->calm_left)
        close_calm(st, cpu);
    reset_apic(st, M_XAPIC, XAPIC_DEFAULT_BASE);  /* timers off, quiet */
    __atomic_fetch_add(&finished, 1, __ATOMIC_SEQ_CST);
}

static void fuzz(u32 cpu)
{
    struct cpu_state *st = &cs[cpu];
    u64 base = rdmsr(MSR_IA32_APIC_BASE);

    st->rng = (seed + 1) * 0x9e3779b9u ^ (cpu + 1) * 0x85ebca6bu;
    if (!st->rng)
        st->rng = 1;
    for (int i = 0; i < 8; i++)
        xorshift(&st->rng);
    st->mode = mode_of(base);
    st->base = (u32)base & APIC_BASE_ADDR_MASK;
    st->base_hi = (u32)(base >> 32);
    sti();
    open_calm(st, cpu);
    fuzz_loop(st, cpu);
}

/* The restart trampoline (SDM 8.4.4.1, 9.9.1), like guest/lib/trampoline.S but the CPU
 * keeps its index: it finds its APIC ID (CPUID.1:EBX[31:24]) in fz_ids and takes that
 * index's stack, so cpu_index() is unchanged. */
extern char fz_tramp_start[], fz_tramp_end[], fz_tramp_gdtr[], kvmpy_gdt_descr[];
asm(".section .rodata\n"
    ".code16\n"
    ".align 16\n"
    "fz_tramp_start:\n"
    "    cli\n"
    "    cld\n"
    "    lgdtl %cs:(fz_tramp_gdtr - fz_tramp_start)\n"
    "    movl %cr0, %eax\n"
    "    orl $1, %eax\n"
    "    movl %eax, %cr0\n"
    "    ljmpl $0x08, $fz_tramp32\n"
    ".align 4\n"
    "fz_tramp_gdtr:\n"
    "    .word 0\n"
    "    .long 0\n"
    "fz_tramp_end:\n"
    ".text\n"
    ".code32\n"
    "fz_tramp32:\n"
    "    movl $0x10, %eax\n"
    "    movl %eax, %ds\n"
    "    movl %eax, %es\n"
    "    movl %eax, %fs\n"
    "    movl %eax, %gs\n"
    "    movl %eax, %ss\n"
    "    movl $1, %eax\n"
    "    cpuid\n"
    "    shrl $24, %ebx\n"
    "    xorl %ecx, %ecx\n"
    "1:  cmpl %ebx, fz_ids(,%ecx,4)\n"
    "    je 2f\n"
    "    incl %ecx\n"
    "    cmpl $8, %ecx\n"
    "    jb 1b\n"
    "3:  cli\n"
    "    hlt\n"
    "    jmp 3b\n"
    "2:  leal 1(%ecx), %eax\n"
    "    shll $12, %eax\n"
    "    leal kvmpy_stacks(%eax), %esp\n"
    "    pushl %ecx\n"
    "    call fz_restart\n"
    "    jmp 3b\n");

/* An AP whose quota is done: halt with interrupts on until the BSP closes the run, then
 * turn them off for good and say so. The test runs with IF=0 and STI's shadow covers
 * the HLT, so a close IPI that comes after the test still ends the HLT. */
static void ap_idle(void)
{
    for (;;) {
        cli();
        if (__atomic_load_n(&closing, __ATOMIC_SEQ_CST))
            break;
        asm volatile("sti; hlt" : : : "memory");
    }
    __atomic_fetch_add(&closed, 1, __ATOMIC_SEQ_CST);
    for (;;)
        asm volatile("cli; hlt" : : : "memory");
}

/* BSP, every CPU done: make every AP stop taking interrupts (ap_idle), so that the
 * counters added up next are final. */
static void close_run(struct cpu_state *st)
{
    __atomic_store_n(&closing, 1, __ATOMIC_SEQ_CST);
    for (u32 k = 0; k < CLOSE_TRIES && closed < ncpus - 1; k++) {
        send_icr(st, APIC_DM_FIXED | APIC_INT_ASSERT | APIC_DEST_ALLBUT | CLOSE_VECTOR, 0);
        for (u32 i = 0; i < DRAIN_POLLS && closed < ncpus - 1; i++)
            pause();
    }
    if (closed < ncpus - 1) {
        st->close_timeouts++;
        printf("fuzz: only %u of %u APs acknowledged the close\n", closed, ncpus - 1);
    }
}

void ap_main(u32 cpu)
{
    while (!go)
        pause();
    fuzz(cpu);
    ap_idle();
}

#define SUM(field) ({ u32 s_ = 0; for (u32 c_ = 0; c_ < ncpus; c_++) s_ += cs[c_].field; s_; })

int main(struct multiboot_info *mbi)
{
    const char *cmdline = mbi_cmdline(mbi);
    const char *a;
    u32 ops, lost = 0, invented = 0, tok_recv = 0, tok_expected = 0, bad;

    seed = (a = cmdline_value(cmdline, "seed")) ? parse_u32(a) : 1;
    ops = (a = cmdline_value(cmdline, "ops")) ? parse_u32(a) : 2000;
    ncpus = (a = cmdline_value(cmdline, "cpus")) ? parse_u32(a) : smp_cpus_available();
    calm_mode = 3;
    initsipi = (a = cmdline_value(cmdline, "initsipi")) ? parse_u32(a) : 0;
    if ((a = cmdline_value(cmdline, "mode"))) {
        if (!strncmp(a, "xapic", 5))
            calm_mode = M_XAPIC;
        else if (!strncmp(a, "x2apic", 6))
            calm_mode = M_X2APIC;
    }
    if (ncpus < 1 || ncpus > MAX_CPUS) {
        printf("fuzz: cpus must be 1..%u\n", MAX_CPUS);
        return 2;
    }
    maxphyaddr = cpuid(0x80000000u, 0).a >= 0x80000008u ? cpuid(0x80000008u, 0).a & 0xff : 36;
    quota = ops / ncpus;

    if (apic_enable(APIC_MODE_XAPIC)) {
        printf("fuzz: cannot enable the APIC\n");
        return 2;
    }
    if (smp_start(ncpus) != ncpus) {
        printf("fuzz: only %u of %u cpus came up\n", smp_online(), ncpus);
        return 2;
    }
    for (u32 c = 0; c < ncpus; c++)
        ids[c] = smp_apic_id(c);
    /* After smp_start: apic_enable() installs its own spurious-vector handler, which
     * does not EOI, and an IPI or timer may well use vector 0xff. */
    for (u32 v = 0; v < 32; v++)
        if (v != 2)
            handler[v] = on_exception;
    handler[2] = on_nmi;
    for (u32 v = 16; v < 256; v++)
        handler[v] = on_interrupt;
    for (u32 v = 0; v < NTOK; v++)
        handler[TOK_BASE + v] = on_token;
    printf("fuzz: seed=%u cpus=%u mode=%s ops=%u initsipi=%u\n", seed, ncpus,
           calm_mode == 3 ? "mixed" : calm_mode == M_XAPIC ? "xapic" : "x2apic",
           quota * ncpus, initsipi);
    if (initsipi) {
        memcpy((void *)RESTART_PAGE, fz_tramp_start, fz_tramp_end - fz_tramp_start);
        memcpy((void *)(RESTART_PAGE + (fz_tramp_gdtr - fz_tramp_start)), kvmpy_gdt_descr, 6);
    }
    go = 1;
    fuzz(0);
    while (finished < ncpus)
        pause();
    close_run(&cs[0]);
    cli();

    for (u32 t = 0; t < ncpus; t++)
        for (u32 v = 0; v < NTOK; v++) {
            u32 s = 0;
            for (u32 c = 0; c < ncpus; c++)
                s += sent[c][t][v];
            tok_expected += s;
            tok_recv += received[t][v];
            if (received[t][v] < s)
                lost += s - received[t][v];
            if (received[t][v] > s)
                invented += received[t][v] - s;
            if (received[t][v] != s)
                printf("fuzz: cpu %u (apic %u) vector %x received %u sent %u\n", t, ids[t],
                       TOK_BASE + v, received[t][v], s);
            if (token[t][v])
                printf("fuzz: token cpu %u vector %x never came back\n", t, TOK_BASE + v);
        }
    printf("fuzz: ops=%u gp=%u interrupts=%u nmi=%u other_faults=%u spurious=%u storms=%u\n",
           SUM(ops), SUM(gp), SUM(irqs), SUM(nmis), SUM(other_faults), SUM(spurious),
           SUM(storms));
    printf("fuzz: msr_reads=%u msr_writes=%u mmio_reads=%u mmio_writes=%u pio=%u "
           "pio_string=%u icr_random=%u timer_ops=%u base_writes=%u phases=%u\n",
           SUM(msr_rd), SUM(msr_wr), SUM(mmio_rd), SUM(mmio_wr), SUM(pio), SUM(pio_str),
           SUM(icr_random), SUM(timer_ops), SUM(base_writes), SUM(phases));
    printf("fuzz: tokens_sent=%u tokens_expected=%u tokens_received=%u tokens_busy=%u "
           "tokens_refused=%u send_faults=%u drain_timeouts=%u\n",
           SUM(tok_sent), tok_expected, tok_recv, SUM(tok_busy), SUM(tok_refused),
           SUM(send_faults), SUM(drain_timeouts));
    printf("fuzz: base_mismatch=%u hole_bad=%u mmio_bad=%u restore_faults=%u resets=%u "
           "restart_timeouts=%u\n", SUM(base_mismatch), SUM(hole_bad), SUM(mmio_bad),
           SUM(restore_faults), SUM(resets), SUM(restart_timeouts));
    printf("fuzz: ioapic_ops=%u ioapic_bad=%u ioapic_lines=%u ioapic_quiets=%u\n",
           SUM(io_ops), SUM(io_bad), SUM(io_lines), SUM(io_quiets));
    printf("fuzz: closed=%u close_timeouts=%u\n", closed, SUM(close_timeouts));
    printf("fuzz: handled");
    for (u32 c = 0; c < ncpus; c++)
        printf(" apic%u=%u", ids[c], cs[c].irqs);
    printf("\n");
    printf("fuzz: lost=%u invented=%u\n", lost, invented);
    bad = lost + invented + SUM(base_mismatch) + SUM(hole_bad) + SUM(mmio_bad) + SUM(io_bad)
          + SUM(send_faults) + SUM(restore_faults) + SUM(restart_timeouts)
          + SUM(close_timeouts);
    if (bad) {
        printf("fuzz: FAILED\n");
        return 1;
    }
    printf("fuzz: done\n");
    return 0;
}
