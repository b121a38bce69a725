/* gp_msr: writes and reads a nonexistent MSR (0xdeadbeef, or "msr=N" from the command
 * line) with the *_safe helpers, prints the vector each got (13 = #GP), and exits with
 * the vector the write got. */
#include "kvmpy.h"

int main(struct multiboot_info *mbi)
{
    const char *arg = cmdline_value(mbi_cmdline(mbi), "msr");
    u32 msr = arg ? parse_u32(arg) : 0xdeadbeefu;
    u64 val;
    int wr, rd;

    wr = wrmsr_safe(msr, 0x1234567890abcdefull);
    printf("gp_msr: wrmsr %x -> vector %d\n", msr, wr);
    rd = rdmsr_safe(msr, &val);
    printf("gp_msr: rdmsr %x -> vector %d value %llx\n", msr, rd, val);
    return wr;
}
