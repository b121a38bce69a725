/* kvmpy guest runtime: types, port/MSR/CPU helpers, serial output, exit, interrupts.
 *
 * Guests are 32-bit protected-mode multiboot kernels, paging off, one flat code and
 * one flat data segment. Kernel code runs in KVM's instruction emulator here
 * (~2 us per instruction, no SSE, no 32-bit IRET): keep loops short.
 */
#ifndef KVMPY_H
#define KVMPY_H

#include <stdarg.h>
#include "kvmpy_asm.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed int s32;
typedef unsigned int size_t;

#define NULL ((void *)0)

/* ---- Multiboot information (Multiboot 0.6.96 section 3.3) ---- */

#define MBI_FLAG_MEM (1u << 0)
#define MBI_FLAG_CMDLINE (1u << 2)
#define MBI_FLAG_MODS (1u << 3)
#define MBI_FLAG_MMAP (1u << 6)
#define MBI_FLAG_BOOT_LOADER_NAME (1u << 9)

struct multiboot_info {
    u32 flags;
    u32 mem_lower;          /* KiB below 640 KiB */
    u32 mem_upper;          /* KiB above 1 MiB */
    u32 boot_device;
    u32 cmdline;            /* physical address of a NUL-terminated string */
    u32 mods_count;
    u32 mods_addr;          /* struct multiboot_module[mods_count] */
    u32 syms[4];
    u32 mmap_length;        /* bytes */
    u32 mmap_addr;          /* struct multiboot_mmap_entry, each size + 4 bytes long */
    u32 drives_length;
    u32 drives_addr;
    u32 config_table;
    u32 boot_loader_name;
    u32 apm_table;
    u32 vbe[6];
};

struct multiboot_module {
    u32 mod_start;
    u32 mod_end;
    u32 cmdline;
    u32 reserved;
};

struct multiboot_mmap_entry {
    u32 size;               /* of the rest of the entry */
    u64 addr;
    u64 len;
    u32 type;               /* 1 = available RAM */
} __attribute__((packed));

/* The guest's entry point, called on every CPU with the multiboot info. Its return
 * value is the exit code. */
int main(struct multiboot_info *mbi);

/* ---- Port I/O, MSRs, CPU instructions ---- */

static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { asm volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { asm volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

static inline u8 inb(u16 port)
{
    u8 v;
    asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u16 inw(u16 port)
{
    u16 v;
    asm volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u32 inl(u16 port)
{
    u32 v;
    asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 val)
{
    asm volatile("wrmsr" : : "c"(msr), "a"((u32)val), "d"((u32)(val >> 32)) : "memory");
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

struct cpuid_regs {
    u32 a, b, c, d;
};

static inline struct cpuid_regs cpuid(u32 leaf, u32 subleaf)
{
    struct cpuid_regs r;
    asm volatile("cpuid" : "=a"(r.a), "=b"(r.b), "=c"(r.c), "=d"(r.d) : "a"(leaf), "c"(subleaf));
    return r;
}

static inline void pause(void) { asm volatile("pause" : : : "memory"); }
static inline void hlt(void) { asm volatile("hlt" : : : "memory"); }
static inline void cli(void) { asm volatile("cli" : : : "memory"); }
static inline void sti(void) { asm volatile("sti" : : : "memory"); }

static inline u32 read_eflags(void)
{
    u32 f;
    asm volatile("pushfl; popl %0" : "=r"(f));
    return f;
}

/* ---- Spinlock ---- */

struct spinlock {
    volatile u32 locked;
};

static inline void spin_lock(struct spinlock *l)
{
    u32 v;
    for (;;) {
        v = 1;
        asm volatile("xchgl %0, %1" : "+r"(v), "+m"(l->locked) : : "memory");
        if (!v)
            return;
        while (l->locked)
            pause();
    }
}

static inline void spin_unlock(struct spinlock *l)
{
    asm volatile("" : : : "memory");
    l->locked = 0;
}

/* ---- Serial console (COM1, 16550) and exit (QEMU isa-debug-exit) ---- */

#define COM1_PORT 0x3f8
#define DEBUG_EXIT_PORT 0xf4

void putc(char c);
void puts(const char *s);   /* no newline added */
/* %s %c %d %i %u %x %X %p %%, flags '0' and '-', a width, length 'l' (32 bits) and
 * 'll' (64 bits, printed in hex: there is no 64-bit division here). */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);

/* Writes `code` to port 0xf4 (the VMM exits with status (code << 1) | 1), then halts. */
void exit(int code) __attribute__((noreturn));

/* ---- Interrupts ---- */

/* The registers saved by the interrupt entry, lowest address first (PUSHA order). */
struct frame {
    u32 edi, esi, ebp, esp_unused, ebx, edx, ecx, eax;
    u32 vector;
    u32 error_code;         /* 0 for vectors without one */
    u32 eip;
    u32 cs;
    u32 eflags;
};

typedef void (*interrupt_handler)(struct frame *);

/* Per-vector handlers; NULL uses the default, which prints the vector, error code and
 * EIP and exits with 0x7f (unless a *_safe call is recovering from a fault). */
extern interrupt_handler handler[256];

/* Loads the runtime's IDT on this CPU (the entry point does it; APs started by SIPI
 * call it themselves). */
void kvmpy_load_idt(void);

/* The vector of the fault the instruction raised (13 for #GP), or 0. */
int wrmsr_safe(u32 msr, u64 val);
int rdmsr_safe(u32 msr, u64 *val);

/* This CPU's index: the order in which CPUs reached the entry point, 0 first. */
static inline u32 cpu_index(void)
{
    extern char kvmpy_stacks[];
    u32 esp;
    asm volatile("movl %%esp, %0" : "=r"(esp));
    return (esp - (u32)kvmpy_stacks) >> KVMPY_STACK_SHIFT;
}

/* ---- Strings and the command line ---- */

void *memset(void *s, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* The multiboot command line ("" when the loader gave none). */
const char *mbi_cmdline(const struct multiboot_info *mbi);
/* The value of "key=value" in a space-separated command line, or NULL; the value ends
 * at the next space. */
const char *cmdline_value(const char *cmdline, const char *key);
/* A decimal or 0x-prefixed hex number at `s` (up to the first non-digit). */
u32 parse_u32(const char *s);

/* Sorts v[0..n) in place and returns the median (the lower mean of the middle two). */
u32 median_u32(u32 *v, u32 n);

#endif
