/* gp_msr: writes and reads a nonexistent MSR (0xdeadbeef, or "msr=N" from the command
 * line) with the *_safe helpers, prints the vector each got (13 = #GP), and exits with
 * the vector the write got. The write runs with interrupts off, the read with them on,
 * so both exits of the interrupt return path (with and without STI) are taken; each
 * line shows whether IF survived the fault. */
#include "kvmpy.h"

#define EFLAGS_IF (1u << 9)

int main(struct multiboot_info *mbi)
{
    const char *arg = cmdline_value(mbi_cmdline(mbi), "msr");
    u32 msr = arg ? parse_u32(arg) : 0xdeadbeefu;
    u64 val;
    int wr, rd;
    u32 if_after;

    cli();
    wr = wrmsr_safe(msr, 0x1234567890abcdefull);
    if_after = read_eflags() & EFLAGS_IF;
    printf("gp_msr: wrmsr %x -> vector %d, if=%u\n", msr, wr, if_after ? 1 : 0);

    sti();
    rd = rdmsr_safe(msr, &val);
    if_after = read_eflags() & EFLAGS_IF;
    cli();
    printf("gp_msr: rdmsr %x -> vector %d value %llx, if=%u\n", msr, rd, val, if_after ? 1 : 0);
    return wr;
}
