/* apic_gp: the architectural #GP cases of x2APIC MSR access and IA32_APIC_BASE writes
 * (SDM Vol. 3 10.12.1.2-10.12.1.3, 10.12.5, Table 10-6), and ESR "send illegal vector"
 * (SDM 10.5.3) in both modes.
 *
 * Each MSR case prints "gp NAME: vector V expected E" (V = the fault vector the access
 * raised, 0 for none); each ESR case prints "esr NAME: bit5 B expected 1 (esr 0xNN)".
 * The IPIs the valid ICR writes send (vector 0x50, to self) are counted and checked:
 * "stray: got N expected M". Ends with "apic_gp: ok" (exit 0) or
 * "apic_gp: FAILED (n mismatches)" (exit 1).
 */
#include "apic.h"

#define GP 13
#define V_OK 0x50
#define SETTLE_POLLS 2000

static volatile u32 received;
static u32 sent_ok;
static u32 mismatches;
static u32 self_id;

static void count_ok(struct frame *f)
{
    (void)f;
    received++;
    apic_eoi();
}

static void check(const char *name, int got, int expected)
{
    printf("gp %s: vector %d expected %d\n", name, got, expected);
    if (got != expected)
        mismatches++;
}

static void wr(const char *name, u32 msr, u64 val, int expected)
{
    check(name, wrmsr_safe(msr, val), expected);
}

static void rd(const char *name, u32 msr, int expected)
{
    u64 v;

    check(name, rdmsr_safe(msr, &v), expected);
}

/* A valid fixed IPI to self with extra ICR bits: #GP if they are reserved. */
static void icr(const char *name, u32 extra_bits, int expected)
{
    u64 val = ((u64)self_id << 32) | APIC_DM_FIXED | V_OK | extra_bits;

    wr(name, X2APIC_MSR(APIC_ICR), val, expected);
    if (expected == 0)
        sent_ok++;
}

static void x2apic_msr_cases(void)
{
    static char name[] = "icr-bit-NN";

    icr("icr-valid", 0, 0);
    icr("icr-bit-12-ignored", APIC_ICR_BUSY, 0);
    icr("icr-bit-13", 1u << 13, GP);
    icr("icr-bit-16", 1u << 16, GP);
    icr("icr-bit-17", 1u << 17, GP);
    for (u32 bit = 20; bit < 32; bit++) {
        name[8] = '0' + bit / 10;
        name[9] = '0' + bit % 10;
        icr(name, 1u << bit, GP);
    }
    rd("icr2-read", 0x831, GP);
    wr("icr2-write", 0x831, (u64)self_id << 24, GP);
    rd("dfr-read", 0x80e, GP);
    wr("dfr-write", 0x80e, 0xffffffff, GP);
    rd("self-ipi-read", 0x83f, GP);
    rd("eoi-read", 0x80b, GP);
    wr("esr-write-nonzero", 0x828, 1, GP);
    wr("esr-write-zero", 0x828, 0, 0);
    wr("eoi-write-nonzero", 0x80b, 1, GP);
    wr("eoi-write-zero", 0x80b, 0, 0);
    wr("id-write", 0x802, 0, GP);
    wr("version-write", 0x803, 0, GP);
    wr("ppr-write", 0x80a, 0, GP);
    wr("ldr-write", 0x80d, 0, GP);
    wr("isr-write", 0x810, 0, GP);
    wr("tmr-write", 0x818, 0, GP);
    wr("irr-write", 0x820, 0, GP);
    wr("timer-current-write", 0x839, 0, GP);
    wr("tpr-upper-bits", 0x808, 1ull << 32, GP);
    wr("svr-upper-bits", 0x80f, (1ull << 32) | APIC_SVR_ENABLE | APIC_SPURIOUS_VECTOR, GP);
    wr("lvt-timer-upper-bits", 0x832, (1ull << 32) | APIC_LVT_MASKED, GP);
    wr("self-ipi-bits-above-7", 0x83f, 0x100 | V_OK, GP);
    rd("nonexistent-804-read", 0x804, GP);
    wr("nonexistent-804-write", 0x804, 0, GP);
    rd("apr-809-read", 0x809, GP);
    rd("rrd-80c-read", 0x80c, GP);
    rd("reserved-83a-read", 0x83a, GP);
    rd("reserved-840-read", 0x840, GP);
    rd("id-read", 0x802, 0);
    rd("version-read", 0x803, 0);
    rd("ldr-read", 0x80d, 0);
    rd("ppr-read", 0x80a, 0);
    rd("esr-read", 0x828, 0);
    wr("tpr-write", 0x808, 0, 0);
    wr("self-ipi-write", 0x83f, V_OK, 0);
    sent_ok++;
}

/* ESR bit 5 after a fixed IPI with an illegal vector (< 16); vector 16 is legal. */
static void esr_case(const char *name, u32 vector, u32 expect_bit5)
{
    u32 esr, bit5;

    apic_write(APIC_ESR, 0);
    apic_send_ipi(APIC_DM_FIXED | vector, self_id);
    apic_write(APIC_ESR, 0);    /* latch the errors logged since the last write */
    esr = apic_read(APIC_ESR);
    bit5 = !!(esr & APIC_ESR_SEND_ILLEGAL_VECTOR);
    printf("esr %s-%s: bit5 %u expected %u (esr 0x%02x)\n", name, apic_mode_name(apic_mode()),
           bit5, expect_bit5, esr);
    if (bit5 != expect_bit5)
        mismatches++;
}

static void esr_cases(void)
{
    esr_case("send-vector-0", 0, 1);
    esr_case("send-vector-3", 3, 1);
    esr_case("send-vector-15", 15, 1);
    apic_set_handler(16, count_ok);
    esr_case("send-vector-16", 16, 0);
    sent_ok++;
}

static void apic_base_cases(void)
{
    u64 base = rdmsr(MSR_IA32_APIC_BASE) & ~(u64)(APIC_BASE_EN | APIC_BASE_EXTD);
    u64 x2 = base | APIC_BASE_EN | APIC_BASE_EXTD;

    check("base-x2apic-to-xapic", apic_set_base(base | APIC_BASE_EN), GP);
    check("base-en0-extd1", apic_set_base(base | APIC_BASE_EXTD), GP);
    check("base-reserved-bit-9", apic_set_base(x2 | (1u << 9)), GP);
    check("base-reserved-bit-0", apic_set_base(x2 | 1), GP);
    check("base-reserved-bit-63", apic_set_base(x2 | (1ull << 63)), GP);
    check("base-x2apic-to-disabled", apic_set_base(base), 0);
    rd("x2apic-msr-while-disabled", 0x802, GP);
    check("base-disabled-to-x2apic", apic_set_base(x2), GP);
    check("base-disabled-en0-extd1", apic_set_base(base | APIC_BASE_EXTD), GP);
    check("base-disabled-to-xapic", apic_set_base(base | APIC_BASE_EN), 0);
    rd("x2apic-msr-in-xapic-mode", 0x802, GP);
    wr("x2apic-icr-in-xapic-mode", 0x830, ((u64)self_id << 32) | V_OK, GP);
    check("base-xapic-en0-extd1", apic_set_base(base | APIC_BASE_EXTD), GP);
    apic_write(APIC_SVR, APIC_SVR_ENABLE | APIC_SPURIOUS_VECTOR);
    esr_cases();
    check("base-xapic-to-x2apic", apic_set_base(x2), 0);
    apic_write(APIC_SVR, APIC_SVR_ENABLE | APIC_SPURIOUS_VECTOR);
    rd("id-read-after-return", 0x802, 0);
}

int main(struct multiboot_info *mbi)
{
    (void)mbi;
    if (!(cpuid(1, 0).c & (1u << 21)) || apic_enable(APIC_MODE_X2APIC)) {
        printf("apic_gp: no x2APIC\n");
        return 1;
    }
    self_id = apic_id();
    apic_set_handler(V_OK, count_ok);
    sti();

    x2apic_msr_cases();
    esr_cases();
    apic_base_cases();

    for (u32 i = 0; i < SETTLE_POLLS && received < sent_ok; i++)
        pause();
    printf("stray: got %u expected %u\n", received, sent_ok);
    if (received != sent_ok)
        mismatches++;
    if (mismatches) {
        printf("apic_gp: FAILED (%u mismatches)\n", mismatches);
        return 1;
    }
    printf("apic_gp: ok\n");
    return 0;
}
