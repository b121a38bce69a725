/* Multiboot header and entry point (Multiboot 0.6.96 sections 3.1 and 3.2).
 *
 * The loader enters at _start in 32-bit protected mode with paging off,
 * EAX = 0x2BADB002 and EBX = the multiboot info. Several vCPUs may enter here at
 * once: each claims a CPU index with LOCK XADD and takes the stack of that index;
 * CPU 0 zeroes the bss and builds the IDT, the others wait until it has.
 */
#include "kvmpy_asm.h"

#define MB_HEADER_MAGIC 0x1BADB002
#define MB_HEADER_FLAGS 0x00000003  /* page-align modules, want memory info */

    .section .multiboot, "a"
    .align 4
    .long MB_HEADER_MAGIC
    .long MB_HEADER_FLAGS
    .long -(MB_HEADER_MAGIC + MB_HEADER_FLAGS)

    .text
    .globl _start
_start:
    cli
    cld
    movb $0xff, %al                 /* mask both 8259 PICs: the BIOS state kvmpy sets */
    outb %al, $0x21                 /* up leaves the timer unmasked, and our guests use */
    outb %al, $0xa1                 /* the APICs only (kvm-unit-tests' cstart does this) */
    movl %ebx, %esi                 /* multiboot info, kept in ESI */
    lgdtl gdt_descr
    ljmpl $KVMPY_CODE_SEL, $1f      /* reload CS from our own GDT */
1:  movl $KVMPY_DATA_SEL, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %fs
    movl %eax, %gs
    movl %eax, %ss

    movl $1, %eax
    lock xaddl %eax, cpu_count      /* EAX = this CPU's index */
    cmpl $KVMPY_MAX_CPUS, %eax
    jae too_many_cpus
    leal 1(%eax), %ecx
    shll $KVMPY_STACK_SHIFT, %ecx
    leal kvmpy_stacks(%ecx), %esp   /* top of this CPU's stack */
    movl %eax, %ebx                 /* CPU index */
    testl %ebx, %ebx
    jnz wait_for_cpu0

    movl $__bss_start, %edi         /* CPU 0: zero the bss, build the IDT */
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    call kvmpy_runtime_init
    movl $1, runtime_ready
    jmp 2f

wait_for_cpu0:
    pause
    cmpl $0, runtime_ready
    je wait_for_cpu0

2:  pushl %esi                      /* kvmpy_runtime_start(cpu, mbi): never returns */
    pushl %ebx
    call kvmpy_runtime_start

too_many_cpus:
    cli
    hlt
    jmp too_many_cpus

    .data
    .align 8
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff        /* 0x08: code, base 0, limit 4 GiB, 32-bit, accessed */
    .quad 0x00cf93000000ffff        /* 0x10: data, base 0, limit 4 GiB, accessed */
gdt_end:
    .align 4
    .word 0
    .globl kvmpy_gdt_descr              /* for the AP trampoline (trampoline.S) */
kvmpy_gdt_descr:
gdt_descr:
    .word gdt_end - gdt - 1
    .long gdt

    .align 4
    .globl kvmpy_cpu_count              /* APs started by SIPI claim indexes here too */
kvmpy_cpu_count:
cpu_count:
    .long 0
runtime_ready:
    .long 0

    .section .stack, "aw", @nobits
    .align 4096
    .globl kvmpy_stacks
kvmpy_stacks:
    .skip KVMPY_MAX_CPUS << KVMPY_STACK_SHIFT
