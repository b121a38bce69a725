/* hello: prints a greeting and the multiboot command line, exits with code 1
 * (VMM exit status 3). */
#include "kvmpy.h"

int main(struct multiboot_info *mbi)
{
    printf("hello from kvmpy\n");
    printf("cmdline: %s\n", mbi_cmdline(mbi));
    return 1;
}
