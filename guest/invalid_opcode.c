/* invalid_opcode: runs bytes that are no x86 instruction, 0f 38 f0 c0 (MOVBE encodes
 * a memory operand only: with ModRM.mod = 11b there is no instruction, SDM Vol. 2B
 * MOVBE), and expects an invalid-opcode exception there (SDM Vol. 3A 6.15, #UD).
 *
 * On hardware the CPU raises #UD. On kvm_pvm KVM's instruction emulator runs the guest's
 * CPL0 code, fails to decode it and exits with KVM_EXIT_INTERNAL_ERROR; kvmpy then
 * finds no instruction there either and injects #UD (kvmpy/exits.py
 * invalid_opcode_to_ud). Prints "invalid_opcode: vector V at the instruction" (or
 * "elsewhere") and exits 0 if V is 6.
 */
#include "kvmpy.h"

static volatile u32 seen_vector, seen_eip;

static void on_ud(struct frame *f)
{
    seen_vector = f->vector;
    seen_eip = f->eip;
    f->eip += 4;                    /* skip the 4 bytes */
}

/* The bytes live in .data (executable here: no paging), so .text stays all
 * instructions; called, they fault, and on_ud's skip lands on the RET. */
asm(".data\n.globl no_insn\nno_insn: .byte 0x0f, 0x38, 0xf0, 0xc0\n ret\n.text");

int main(struct multiboot_info *mbi)
{
    extern char no_insn[];

    (void)mbi;
    handler[6] = on_ud;
    asm volatile("call no_insn" ::: "memory", "eax", "ecx", "edx");
    printf("invalid_opcode: vector %u at %s\n", seen_vector,
           seen_eip == (u32)no_insn ? "the instruction" : "elsewhere");
    return seen_vector == 6 ? 0 : 1;
}
