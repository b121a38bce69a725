/* mmio_touch: reads and writes an address with no RAM or device behind it
 * (0xd0000000, in the PCI hole), prints what the reads returned (an unbacked
 * read gives all ones: ffffffff), and exits with 1. "addr=0x..." overrides it. */
#include "kvmpy.h"

int main(struct multiboot_info *mbi)
{
    const char *arg = cmdline_value(mbi_cmdline(mbi), "addr");
    volatile u32 *p = (volatile u32 *)(arg ? parse_u32(arg) : 0xd0000000u);
    u32 before, after;

    before = *p;
    printf("mmio_touch: read %p = %08x\n", (void *)p, before);
    *p = 0x12345678;
    after = *p;
    printf("mmio_touch: wrote 12345678, read back %08x\n", after);
    return 1;
}
