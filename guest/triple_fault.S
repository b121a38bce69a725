/* triple_fault: loads an empty IDT (limit 0) and executes UD2. The #UD cannot be
 * delivered (vector outside the IDT limit: #GP), nor can that #GP (#DF), nor the #DF:
 * the CPU shuts down (SDM Vol. 3 section 6.15, interrupt 8). If it is still running
 * afterwards it says so and exits with 0x7e. */
    .text
    .globl main
main:
    pushl $msg_start
    call puts
    addl $4, %esp
    lidtl empty_idt
    ud2
    pushl $msg_alive
    call puts
    addl $4, %esp
    movl $0x7e, %eax
    ret

    .section .rodata
msg_start:
    .asciz "triple_fault: loading an empty IDT and executing ud2\n"
msg_alive:
    .asciz "triple_fault: still alive after ud2\n"

    .data
    .align 4
    .word 0
empty_idt:
    .word 0                         /* limit 0: no vector is inside the IDT */
    .long 0
