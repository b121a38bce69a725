/* apic_smp: SMP bring-up with INIT, SIPI, SIPI (SDM Vol. 3 8.4.4.1).
 *
 * Command line: "cpus=N" (default: every CPU the VMM offers, from fw_cfg or CPUID) and
 * "mode=x2apic" (default xapic). The BSP enables its APIC in that mode and starts N-1
 * APs through a real-mode trampoline; each AP enables the same mode and prints
 *   "apic_smp: cpu C apic id I mode M"
 * Then the BSP prints "apic_smp: expected N online N" and exits with 0 if all came up
 * with distinct APIC IDs that match their CPUID initial APIC IDs, else 1.
 */
#include "apic.h"

#define WAIT_POLLS 300000

static struct spinlock print_lock;
static volatile u32 id_mismatch;
static volatile u32 printed;

void ap_main(u32 cpu)
{
    u32 id = apic_id();

    spin_lock(&print_lock);
    printf("apic_smp: cpu %u apic id %u mode %s\n", cpu, id, apic_mode_name(apic_mode()));
    if (id != cpuid(1, 0).b >> 24)
        id_mismatch++;
    printed++;
    spin_unlock(&print_lock);
    smp_idle();
}

int main(struct multiboot_info *mbi)
{
    const char *cmdline = mbi_cmdline(mbi);
    const char *arg = cmdline_value(cmdline, "cpus");
    const char *mode_arg = cmdline_value(cmdline, "mode");
    enum apic_mode mode = APIC_MODE_XAPIC;
    u32 avail = smp_cpus_available();
    u32 want = arg ? parse_u32(arg) : avail;
    u32 got, dup = 0;

    if (mode_arg && !strncmp(mode_arg, "x2apic", 6))
        mode = APIC_MODE_X2APIC;
    if (apic_enable(mode)) {
        printf("apic_smp: cannot enable %s\n", apic_mode_name(mode));
        return 1;
    }
    printf("apic_smp: bsp apic id %u mode %s, %u cpus available\n", apic_id(),
           apic_mode_name(apic_mode()), avail);
    got = smp_start(want);
    for (u32 i = 0; i < WAIT_POLLS && printed + 1 < got; i++)
        pause();

    spin_lock(&print_lock);
    for (u32 a = 0; a < got; a++)
        for (u32 b = a + 1; b < got; b++)
            if (smp_apic_id(a) == smp_apic_id(b))
                dup++;
    printf("apic_smp: expected %u online %u\n", want, got);
    if (dup || id_mismatch)
        printf("apic_smp: %u duplicate apic ids, %u ids differ from cpuid\n", dup, id_mismatch);
    spin_unlock(&print_lock);
    return got == want && !dup && !id_mismatch ? 0 : 1;
}
