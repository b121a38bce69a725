/* mbinfo: prints the multiboot information, one "key=value" per line, so a test can
 * check the loader end to end, then exits with 1:
 *   flags=%08x, mem_lower=, mem_upper= (KiB), mmap base=%llx length=%llx type=%u (each
 *   entry), cmdline=, boot_loader_name=, mods_count=, mod0 start= end= cmdline=, and
 *   mod0 data= with the first 256 bytes of module 0, non-printable bytes as \xNN. */
#include "kvmpy.h"

#define MOD_DATA_MAX 256

static void print_escaped(const u8 *data, u32 len)
{
    for (u32 i = 0; i < len; i++) {
        if (data[i] >= 0x20 && data[i] < 0x7f && data[i] != '\\')
            putc((char)data[i]);
        else
            printf("\\x%02x", data[i]);
    }
}

int main(struct multiboot_info *mbi)
{
    printf("flags=%08x\n", mbi->flags);
    if (mbi->flags & MBI_FLAG_MEM)
        printf("mem_lower=%u\nmem_upper=%u\n", mbi->mem_lower, mbi->mem_upper);
    if (mbi->flags & MBI_FLAG_MMAP) {
        u32 p = mbi->mmap_addr, end = mbi->mmap_addr + mbi->mmap_length;
        while (p < end) {
            struct multiboot_mmap_entry *e = (struct multiboot_mmap_entry *)p;
            printf("mmap base=%llx length=%llx type=%u\n", e->addr, e->len, e->type);
            p += e->size + 4;
        }
    }
    printf("cmdline=%s\n", mbi_cmdline(mbi));
    if (mbi->flags & MBI_FLAG_BOOT_LOADER_NAME)
        printf("boot_loader_name=%s\n", (const char *)mbi->boot_loader_name);
    if (mbi->flags & MBI_FLAG_MODS) {
        printf("mods_count=%u\n", mbi->mods_count);
        if (mbi->mods_count) {
            struct multiboot_module *m = (struct multiboot_module *)mbi->mods_addr;
            u32 len = m->mod_end - m->mod_start;
            printf("mod0 start=%x end=%x cmdline=%s\n", m->mod_start, m->mod_end,
                   (const char *)m->cmdline);
            puts("mod0 data=");
            print_escaped((const u8 *)m->mod_start, len < MOD_DATA_MAX ? len : MOD_DATA_MAX);
            putc('\n');
        }
    }
    return 1;
}
