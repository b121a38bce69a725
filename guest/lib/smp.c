/* SMP bring-up as on hardware (SDM Vol. 3 8.4.4.1): a real-mode trampoline below 1 MiB,
 * INIT, SIPI, SIPI; and smp_call(), a way to run code on an idle AP. */
#include "apic.h"

#define FW_CFG_CTL 0x510
#define FW_CFG_DATA 0x511
#define FW_CFG_SIGNATURE 0x00
#define FW_CFG_NB_CPUS 0x05
#define ONLINE_POLLS 1000000    /* ~7 s at ~7 us per emulated poll: only a failure waits */
#define SIPI_GAP_POLLS 100      /* the SDM's 200 us between the two SIPIs, roughly */
#define CALL_POLLS 1000000

extern char smp_trampoline_start[], smp_trampoline_end[], smp_trampoline_gdtr[];
extern char kvmpy_gdt_descr[];

struct call {
    void (*volatile fn)(void *);
    void *volatile arg;
    volatile u32 done;
};

static volatile u32 online;
static u32 apic_ids[KVMPY_MAX_CPUS];
static enum apic_mode ap_mode;
static struct call calls[KVMPY_MAX_CPUS];

static u32 fw_cfg_read(u16 key, u32 bytes)
{
    u32 v = 0;

    outw(FW_CFG_CTL, key);
    for (u32 i = 0; i < bytes; i++)
        v |= (u32)inb(FW_CFG_DATA) << (8 * i);
    return v;
}

u32 smp_cpus_available(void)
{
    u32 n = 0;

    if (fw_cfg_read(FW_CFG_SIGNATURE, 4) == 0x554d4551)    /* "QEMU" */
        n = fw_cfg_read(FW_CFG_NB_CPUS, 2);
    if (!n && (cpuid(1, 0).d & (1u << 28)))                 /* HTT: EBX[23:16] valid */
        n = (cpuid(1, 0).b >> 16) & 0xff;
    if (!n)
        n = 1;
    return n > KVMPY_MAX_CPUS ? KVMPY_MAX_CPUS : n;
}

u32 smp_online(void)
{
    return online ? online : 1;
}

u32 smp_apic_id(u32 cpu)
{
    return apic_ids[cpu];
}

static void wake(struct frame *f)
{
    (void)f;
    apic_eoi();
}

void smp_idle(void)
{
    struct call *c = &calls[cpu_index()];

    for (;;) {
        void (*fn)(void *);

        cli();
        fn = c->fn;
        if (!fn) {
            asm volatile("sti; hlt" : : : "memory");   /* STI's shadow covers HLT */
            continue;
        }
        c->fn = NULL;
        sti();
        fn(c->arg);
        c->done = 1;
    }
}

void __attribute__((weak)) ap_main(u32 cpu)
{
    (void)cpu;
    smp_idle();
}

int smp_call(u32 cpu, void (*fn)(void *), void *arg)
{
    struct call *c = &calls[cpu];

    if (cpu == cpu_index()) {
        fn(arg);
        return 0;
    }
    c->done = 0;
    c->arg = arg;
    c->fn = fn;
    apic_send_ipi(APIC_DM_FIXED | SMP_WAKE_VECTOR, apic_ids[cpu]);
    for (u32 i = 0; i < CALL_POLLS; i++) {
        if (c->done)
            return 0;
        pause();
    }
    return -1;
}

/* Called by smp_ap_entry32 (trampoline.S) on the AP's own stack. */
void kvmpy_ap_start(u32 cpu) __attribute__((noreturn));

void kvmpy_ap_start(u32 cpu)
{
    kvmpy_load_idt();
    apic_enable(ap_mode);
    apic_ids[cpu] = apic_id();
    __sync_fetch_and_add(&online, 1);
    ap_main(cpu);
    for (;;)
        asm volatile("cli; hlt" : : : "memory");
}

static void start_aps(u32 icr_shorthand, u32 dest)
{
    u32 vector = SMP_TRAMPOLINE_ADDR >> 12;

    apic_send_ipi(icr_shorthand | APIC_DM_INIT | APIC_INT_ASSERT, dest);
    for (int sipi = 0; sipi < 2; sipi++) {
        apic_send_ipi(icr_shorthand | APIC_DM_STARTUP | vector, dest);
        for (u32 i = 0; i < SIPI_GAP_POLLS; i++)
            pause();
    }
}

/* The BSP's APIC enabled and its ID recorded; returns that ID. */
static u32 bsp_online(void)
{
    u32 self;

    if (apic_mode() == APIC_MODE_DISABLED)
        apic_enable(APIC_MODE_XAPIC);
    self = apic_id();
    if (!online) {
        apic_ids[cpu_index()] = self;
        online = 1;
    }
    return self;
}

/* Before the first SIPI: the APs' APIC mode, their wake-up handler, the trampoline. */
static void install_trampoline(void)
{
    ap_mode = apic_mode();
    handler[SMP_WAKE_VECTOR] = wake;
    memcpy((void *)SMP_TRAMPOLINE_ADDR, smp_trampoline_start,
           smp_trampoline_end - smp_trampoline_start);
    memcpy((void *)(SMP_TRAMPOLINE_ADDR + (smp_trampoline_gdtr - smp_trampoline_start)),
           kvmpy_gdt_descr, 6);
}

u32 smp_start_ids(const u32 *ids, u32 count)
{
    u32 self = bsp_online();
    u32 want = online;

    install_trampoline();
    for (u32 i = 0; i < count; i++) {
        if (ids[i] == self || want >= KVMPY_MAX_CPUS)
            continue;
        start_aps(0, ids[i]);
        want++;
    }
    for (u32 i = 0; i < ONLINE_POLLS && online < want; i++)
        pause();
    return online;
}

u32 smp_start(u32 n)
{
    u32 avail = smp_cpus_available();
    u32 self = bsp_online();

    if (n > KVMPY_MAX_CPUS)
        n = KVMPY_MAX_CPUS;
    if (n <= online)
        return online;
    install_trampoline();

    if (n >= avail) {
        start_aps(APIC_DEST_ALLBUT, 0);
    } else {
        for (u32 id = 0; id < n; id++)
            if (id != self)
                start_aps(0, id);
    }
    for (u32 i = 0; i < ONLINE_POLLS && online < n; i++)
        pause();
    return online;
}
