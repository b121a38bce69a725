/* Local APIC access in xAPIC (MMIO) and x2APIC (MSR) mode (SDM Vol. 3 chapter 10). */
#include "apic.h"

#define XAPIC_DEFAULT_BASE 0xfee00000u
#define ICR_BUSY_POLLS 1000

static enum apic_mode mode_of[KVMPY_MAX_CPUS];
static volatile u32 *mmio_of[KVMPY_MAX_CPUS];

enum apic_mode apic_mode(void)
{
    return mode_of[cpu_index()];
}

const char *apic_mode_name(enum apic_mode mode)
{
    switch (mode) {
    case APIC_MODE_XAPIC:
        return "xapic";
    case APIC_MODE_X2APIC:
        return "x2apic";
    default:
        return "disabled";
    }
}

static enum apic_mode mode_of_base(u64 base)
{
    if (!(base & APIC_BASE_EN))
        return APIC_MODE_DISABLED;
    return (base & APIC_BASE_EXTD) ? APIC_MODE_X2APIC : APIC_MODE_XAPIC;
}

int apic_set_base(u64 value)
{
    u32 cpu = cpu_index();
    int fault = wrmsr_safe(MSR_IA32_APIC_BASE, value);

    if (!fault) {
        mode_of[cpu] = mode_of_base(value);
        mmio_of[cpu] = (volatile u32 *)((u32)value & APIC_BASE_ADDR_MASK);
    }
    return fault;
}

static void ignore_spurious(struct frame *f)
{
    /* A spurious interrupt sets no ISR bit and takes no EOI (SDM 10.9); a real IPI or
     * timer interrupt on the same vector does, or it would block every later one. */
    (void)f;
    if (apic_read(APIC_ISR + 0x70) & (1u << 31))
        apic_eoi();
}

int apic_enable(enum apic_mode mode)
{
    u64 base = rdmsr(MSR_IA32_APIC_BASE);
    enum apic_mode cur = mode_of_base(base);
    int fault = 0;

    base &= ~(u64)(APIC_BASE_EN | APIC_BASE_EXTD);
    if (mode == APIC_MODE_DISABLED || (mode == APIC_MODE_XAPIC && cur == APIC_MODE_X2APIC))
        fault = apic_set_base(base);
    if (!fault && mode != APIC_MODE_DISABLED)
        fault = apic_set_base(base | APIC_BASE_EN);
    if (!fault && mode == APIC_MODE_X2APIC)
        fault = apic_set_base(base | APIC_BASE_EN | APIC_BASE_EXTD);
    if (fault || mode == APIC_MODE_DISABLED)
        return fault;
    handler[APIC_SPURIOUS_VECTOR] = ignore_spurious;
    apic_write(APIC_SVR, APIC_SVR_ENABLE | APIC_SPURIOUS_VECTOR);
    return 0;
}

static volatile u32 *mmio_reg(u32 reg)
{
    volatile u32 *base = mmio_of[cpu_index()];

    if (!base)
        base = (volatile u32 *)XAPIC_DEFAULT_BASE;
    return (volatile u32 *)((u32)base + reg);
}

u32 apic_read(u32 reg)
{
    if (apic_mode() == APIC_MODE_X2APIC)
        return (u32)rdmsr(X2APIC_MSR(reg));
    return *mmio_reg(reg);
}

void apic_write(u32 reg, u32 val)
{
    if (apic_mode() == APIC_MODE_X2APIC)
        wrmsr(X2APIC_MSR(reg), val);
    else
        *mmio_reg(reg) = val;
}

u32 apic_id(void)
{
    u32 id = apic_read(APIC_ID);

    return apic_mode() == APIC_MODE_X2APIC ? id : id >> 24;
}

void apic_eoi(void)
{
    apic_write(APIC_EOI, 0);
}

void apic_send_ipi(u32 icr, u32 dest)
{
    if (apic_mode() == APIC_MODE_X2APIC) {
        wrmsr(X2APIC_MSR(APIC_ICR), ((u64)dest << 32) | icr);
        return;
    }
    *mmio_reg(APIC_ICR2) = dest << 24;
    *mmio_reg(APIC_ICR) = icr;
    for (u32 i = 0; i < ICR_BUSY_POLLS && (*mmio_reg(APIC_ICR) & APIC_ICR_BUSY); i++)
        pause();
}

void apic_set_handler(u32 vector, interrupt_handler h)
{
    handler[vector & 0xff] = h;
}

/* Exact-count guests: print every (cpu, vector) whose received count differs from the
 * expected one, as "<name>: cpu C vector 0xVV: got N expected M"; return how many. */
u32 check_vector_counts(const char *name, volatile u32 (*count)[256], u32 (*expect)[256],
                        u32 ncpus)
{
    u32 errors = 0;

    for (u32 c = 0; c < ncpus; c++)
        for (u32 v = 0; v < 256; v++)
            if (count[c][v] != expect[c][v]) {
                printf("%s: cpu %u vector 0x%02x: got %u expected %u\n", name, c, v,
                       count[c][v], expect[c][v]);
                errors++;
            }
    return errors;
}
