/* Constants shared by the runtime's assembly and C code. */
#ifndef KVMPY_ASM_H
#define KVMPY_ASM_H

#define KVMPY_CODE_SEL 0x08
#define KVMPY_DATA_SEL 0x10
#define KVMPY_MAX_CPUS 64
#define KVMPY_STACK_SHIFT 12        /* 4 KiB stack per CPU */
#define KVMPY_ISR_STUB_SIZE 16      /* bytes between the per-vector entry stubs */

#endif
