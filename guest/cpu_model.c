/* cpu_model: what the guest sees of its CPU model (`kvmpy run --cpu MODEL,+feat,-feat`),
 * and whether the hidden APIC features are enforced, not only hidden.
 *
 * Prints "cpuid vendor V max B ext E family F model M stepping S", "cpuid x2apic X
 * tsc-deadline T hypervisor H apic A" (CPUID.1:ECX[21], ECX[24], ECX[31], EDX[9]) and
 * "brand ...". Then, at CPL0, the architectural answers (SDM 10.12.1, 10.12.5: EXTD is
 * reserved without CPUID x2APIC; 10.5.4.1 and Vol. 4 Table 2-2: IA32_TSC_DEADLINE and
 * timer mode 10b exist only with CPUID TSC-deadline), one line each:
 *   "gp set-extd: vector V"        WRMSR IA32_APIC_BASE with EN|EXTD (from xAPIC)
 *   "gp x2apic-id-read: vector V"  RDMSR 0x802 (x2APIC ID) after that attempt
 *   "gp tsc-deadline-read: vector V" / "gp tsc-deadline-write: vector V"
 *   "lvt timer mode M"             LVT timer mode bits after writing 10b in xAPIC mode
 * and exits 0.
 */
#include "apic.h"

#define MSR_TSC_DEADLINE 0x6e0
#define LVT_TIMER_TSC_DEADLINE (2u << 17)
#define LVT_TIMER_MODE_MASK (3u << 17)

static void vendor_string(char *out, struct cpuid_regs r)
{
    u32 words[3] = {r.b, r.d, r.c};

    for (int i = 0; i < 12; i++)
        out[i] = (char)(words[i / 4] >> (8 * (i % 4)));
    out[12] = 0;
}

static void brand_string(char *out)
{
    u32 *w = (u32 *)out;

    for (u32 leaf = 0; leaf < 3; leaf++) {
        struct cpuid_regs r = cpuid(0x80000002u + leaf, 0);
        w[4 * leaf] = r.a;
        w[4 * leaf + 1] = r.b;
        w[4 * leaf + 2] = r.c;
        w[4 * leaf + 3] = r.d;
    }
    out[48] = 0;
}

int main(struct multiboot_info *mbi)
{
    char vendor[13], brand[49];
    struct cpuid_regs l0 = cpuid(0, 0), l1 = cpuid(1, 0);
    u32 ext = cpuid(0x80000000u, 0).a;
    u32 family = (l1.a >> 8) & 0xf, model = (l1.a >> 4) & 0xf;
    u64 base, value;
    int gp;

    (void)mbi;
    if (family == 0xf)
        family += (l1.a >> 20) & 0xff;
    if (family >= 6)
        model |= ((l1.a >> 16) & 0xf) << 4;
    vendor_string(vendor, l0);
    printf("cpuid vendor %s max %x ext %x family %u model %u stepping %u\n", vendor, l0.a,
           ext, family, model, l1.a & 0xf);
    printf("cpuid x2apic %u tsc-deadline %u hypervisor %u apic %u\n", (l1.c >> 21) & 1,
           (l1.c >> 24) & 1, l1.c >> 31, (l1.d >> 9) & 1);
    if (ext >= 0x80000004u) {
        brand_string(brand);
        printf("brand %s\n", brand);
    }

    base = rdmsr(MSR_IA32_APIC_BASE) & ~(u64)(APIC_BASE_EN | APIC_BASE_EXTD);
    apic_set_base(base | APIC_BASE_EN);     /* xAPIC, whatever the model */
    gp = apic_set_base(base | APIC_BASE_EN | APIC_BASE_EXTD);
    printf("gp set-extd: vector %d\n", gp);
    printf("gp x2apic-id-read: vector %d\n", rdmsr_safe(0x802, &value));
    if (!gp)
        apic_set_base(base);                /* back to xAPIC through disabled */
    apic_enable(APIC_MODE_XAPIC);

    printf("gp tsc-deadline-read: vector %d\n", rdmsr_safe(MSR_TSC_DEADLINE, &value));
    printf("gp tsc-deadline-write: vector %d\n", wrmsr_safe(MSR_TSC_DEADLINE, 0));
    apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED | LVT_TIMER_TSC_DEADLINE | 0xef);
    printf("lvt timer mode %u\n", (apic_read(APIC_LVT_TIMER) & LVT_TIMER_MODE_MASK) >> 17);
    return 0;
}
