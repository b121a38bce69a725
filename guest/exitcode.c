/* exitcode: exits with the code given as "code=N" on the command line (decimal or
 * 0x hex); without one it says so and exits with 0x7e. */
#include "kvmpy.h"

int main(struct multiboot_info *mbi)
{
    const char *code = cmdline_value(mbi_cmdline(mbi), "code");

    if (!code) {
        printf("exitcode: no code=N on the command line\n");
        return 0x7e;
    }
    printf("exitcode: exiting with %u\n", parse_u32(code));
    return (int)parse_u32(code);
}
