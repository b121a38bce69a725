/* smp_hello: every vCPU that enters at the entry point prints its index and initial
 * APIC ID (CPUID leaf 1, EBX[31:24]) under a spinlock. The first CPU to arrive waits
 * for "cpus=N" CPUs (default 1) to have printed, then prints "smp_hello: all N cpus"
 * and exits with 1; the others halt. If they do not all arrive within a bounded wait,
 * it prints how many did and exits with 2. */
#include "kvmpy.h"

#define WAIT_POLLS 200000

static struct spinlock print_lock;
static volatile u32 arrived;

int main(struct multiboot_info *mbi)
{
    const char *arg = cmdline_value(mbi_cmdline(mbi), "cpus");
    u32 expected = arg ? parse_u32(arg) : 1;
    u32 cpu = cpu_index();
    u32 apic_id = cpuid(1, 0).b >> 24;

    spin_lock(&print_lock);
    printf("smp_hello: cpu %u apic id %u\n", cpu, apic_id);
    arrived++;
    spin_unlock(&print_lock);

    if (cpu != 0) {
        for (;;)
            asm volatile("cli; hlt" : : : "memory");
    }
    for (u32 i = 0; arrived < expected && i < WAIT_POLLS; i++)
        pause();
    spin_lock(&print_lock);
    if (arrived < expected) {
        printf("smp_hello: only %u of %u cpus arrived\n", arrived, expected);
        return 2;
    }
    printf("smp_hello: all %u cpus\n", arrived);
    return 1;
}
