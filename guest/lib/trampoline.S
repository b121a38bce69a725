/* The AP start-up trampoline (SDM Vol. 3 8.4.4.1 and 9.9.1, "Switching to Protected
 * Mode").
 *
 * smp_start() copies smp_trampoline_start..smp_trampoline_end to SMP_TRAMPOLINE_ADDR
 * (a 4 KiB-aligned page below 1 MiB) and patches smp_trampoline_gdtr with the runtime's
 * GDT descriptor. A SIPI with vector V starts an AP there in real mode, CS = V << 8,
 * IP = 0: it loads that GDT, sets CR0.PE and far-jumps to smp_ap_entry32 in the image.
 * There it claims the next CPU index (shared with the entry point), takes that index's
 * stack, so cpu_index() works, and calls kvmpy_ap_start(cpu) in smp.c.
 */
#include "kvmpy_asm.h"

#define CR0_PE 1

    .section .rodata
    .code16
    .align 16
    .globl smp_trampoline_start, smp_trampoline_end, smp_trampoline_gdtr
smp_trampoline_start:
    cli
    cld
    lgdtl %cs:(smp_trampoline_gdtr - smp_trampoline_start)
    movl %cr0, %eax
    orl $CR0_PE, %eax
    movl %eax, %cr0
    ljmpl $KVMPY_CODE_SEL, $smp_ap_entry32
    .align 4
smp_trampoline_gdtr:
    .word 0                         /* limit and 32-bit base: patched by smp_start() */
    .long 0
smp_trampoline_end:

    .text
    .code32
smp_ap_entry32:
    movl $KVMPY_DATA_SEL, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %fs
    movl %eax, %gs
    movl %eax, %ss
    movl $1, %eax
    lock xaddl %eax, kvmpy_cpu_count    /* EAX = this CPU's index */
    cmpl $KVMPY_MAX_CPUS, %eax
    jae 1f
    leal 1(%eax), %ecx
    shll $KVMPY_STACK_SHIFT, %ecx
    leal kvmpy_stacks(%ecx), %esp       /* top of this CPU's stack */
    pushl %eax
    call kvmpy_ap_start                 /* never returns */
1:  cli
    hlt
    jmp 1b
