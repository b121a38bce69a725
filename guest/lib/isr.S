/* Interrupt and exception entry for all 256 vectors, and the return path.
 *
 * Each vector's stub pushes a dummy error code (unless the CPU pushed one, SDM Vol. 3
 * section 6.13) and the vector, then the common code saves the registers with PUSHA
 * and calls kvmpy_isr_dispatch(struct frame *).
 *
 * The return does not use IRET: the KVM instruction emulator here cannot execute a
 * 32-bit IRET. The frame [EIP][CS][EFLAGS] is rearranged to [EFLAGS][EIP][CS]; IF is
 * cleared in the saved EFLAGS (BTR keeps its old value in CF), POPF restores the rest,
 * STI runs only if IF was set (its one-instruction shadow covers the LRET), and LRET
 * pops EIP and CS.
 */
#include "kvmpy_asm.h"

#define HAS_ERROR_CODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || (v) == 21 || (v) == 29 || (v) == 30)

    .text
    .align KVMPY_ISR_STUB_SIZE
    .globl kvmpy_isr_stubs
kvmpy_isr_stubs:
    .set vec, 0
    .rept 256
    .align KVMPY_ISR_STUB_SIZE
    .if !HAS_ERROR_CODE(vec)
    pushl $0
    .endif
    pushl $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    pushal
    cld
    pushl %esp                      /* struct frame * */
    call kvmpy_isr_dispatch
    addl $4, %esp
    movl 40(%esp), %eax             /* EIP */
    movl 44(%esp), %ebx             /* CS */
    movl 48(%esp), %ecx             /* EFLAGS */
    movl %ecx, 40(%esp)
    movl %eax, 44(%esp)
    movl %ebx, 48(%esp)
    popal
    addl $8, %esp                   /* vector, error code */
    btrl $9, (%esp)                 /* CF = IF of the interrupted code; clear it */
    jc 1f
    popfl
    lret
1:  popfl
    sti
    lret
