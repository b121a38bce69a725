/* Runtime start-up, exit, the IDT and its dispatcher, and the faulting-MSR helpers. */
#include "kvmpy.h"

struct idt_gate {
    u16 offset_low;
    u16 selector;
    u8 zero;
    u8 type_attr;           /* 0x8e: present, DPL 0, 32-bit interrupt gate */
    u16 offset_high;
} __attribute__((packed));

struct idt_descr {
    u16 limit;
    u32 base;
} __attribute__((packed));

extern char kvmpy_isr_stubs[];

static struct idt_gate idt[256];
interrupt_handler handler[256];

/* Per-CPU recovery for the *_safe helpers: where a fault resumes, and which it was. */
static volatile u32 recovery_eip[KVMPY_MAX_CPUS];
static volatile u32 fault_vector[KVMPY_MAX_CPUS];

void exit(int code)
{
    outl(DEBUG_EXIT_PORT, (u32)code);
    for (;;)
        asm volatile("cli; hlt" : : : "memory");
}

/* Called once, by CPU 0, after the bss is zeroed and before the other CPUs go on. */
void kvmpy_runtime_init(void)
{
    for (u32 v = 0; v < 256; v++) {
        u32 stub = (u32)kvmpy_isr_stubs + v * KVMPY_ISR_STUB_SIZE;
        idt[v].offset_low = stub & 0xffff;
        idt[v].selector = KVMPY_CODE_SEL;
        idt[v].zero = 0;
        idt[v].type_attr = 0x8e;
        idt[v].offset_high = stub >> 16;
    }
}

void kvmpy_load_idt(void)
{
    struct idt_descr d = { sizeof(idt) - 1, (u32)idt };

    asm volatile("lidt %0" : : "m"(d));
}

void kvmpy_runtime_start(u32 cpu, struct multiboot_info *mbi) __attribute__((noreturn));

void kvmpy_runtime_start(u32 cpu, struct multiboot_info *mbi)
{
    (void)cpu;
    kvmpy_load_idt();
    exit(main(mbi));
}

static void unhandled(struct frame *f)
{
    printf("kvmpy: unhandled %s %u, error code %x, at eip %08x\n",
           f->vector < 32 ? "exception" : "interrupt", f->vector, f->error_code, f->eip);
    exit(0x7f);
}

void kvmpy_isr_dispatch(struct frame *f)
{
    u32 cpu = cpu_index();

    /* An NMI (vector 2) is not a fault of the instruction being recovered. */
    if (f->vector < 32 && f->vector != 2 && recovery_eip[cpu]) {
        f->eip = recovery_eip[cpu];
        recovery_eip[cpu] = 0;
        fault_vector[cpu] = f->vector;
        return;
    }
    if (handler[f->vector])
        handler[f->vector](f);
    else
        unhandled(f);
}

/* The MSR instruction runs with a recovery EIP armed: a fault resumes at label 1. */
int wrmsr_safe(u32 msr, u64 val)
{
    u32 cpu = cpu_index();

    fault_vector[cpu] = 0;
    asm volatile("movl $1f, %0\n\t"
                 "wrmsr\n"
                 "1:\tmovl $0, %0"
                 : "=m"(recovery_eip[cpu])
                 : "c"(msr), "a"((u32)val), "d"((u32)(val >> 32))
                 : "memory");
    return fault_vector[cpu];
}

int rdmsr_safe(u32 msr, u64 *val)
{
    u32 cpu = cpu_index();
    u32 lo = 0, hi = 0;

    fault_vector[cpu] = 0;
    asm volatile("movl $1f, %0\n\t"
                 "rdmsr\n"
                 "1:\tmovl $0, %0"
                 : "=m"(recovery_eip[cpu]), "+a"(lo), "+d"(hi)
                 : "c"(msr)
                 : "memory");
    *val = fault_vector[cpu] ? 0 : ((u64)hi << 32) | lo;
    return fault_vector[cpu];
}
