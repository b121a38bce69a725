/* trace_ipi: a short, exactly counted IPI and timer workload to look at with
 * `kvmpy run --trace` (tests/test_tracing.py counts the trace's flows against it).
 *
 * Command line: "n=N" IPIs per phase (default 20, at most 100000), "timer=T" one-shot
 * timer interrupts (default 5), "burst=B" (default 0: no burst phase), "mode=x2apic|xapic"
 * (default x2apic). Needs 2 CPUs.
 * CPU 0 sends fixed IPIs to CPU 1 and keeps at most one outstanding: it waits until
 * CPU 1's handler has counted the last one (just before its EOI), so no IPI merges
 * with another and the counts are exact. Phases:
 *   halted   CPU 1 waits in sti;hlt between IPIs of vector 0x50 (the wake path)
 *   polling  CPU 1 spins in the guest with interrupts enabled: vector 0x51 (the kick)
 *   timer    CPU 0's APIC timer, one-shot, T times, vector 0x52 on CPU 0
 *   burst    (burst=B) n times, B IPIs of vector 0x53 back to back to CPU 1 halted, then
 *            a wait until its count settles: IPIs that find the vector still pending in
 *            IRR merge (SDM 10.8.4), so "received" may be below "sent" here, legitimately
 * Output: "trace_ipi: phase NAME tsc=T" as each phase starts (T: the guest's TSC, in
 * decimal), then "trace_ipi: cpu C vector 0xVV received R sent S" per vector, and
 * "trace_ipi: ok" with exit code 0 (1 if a count is off or a wait timed out).
 */
#include "apic.h"

#define V_HALTED 0x50
#define V_POLLING 0x51
#define V_TIMER 0x52
#define V_BURST 0x53
#define BURST_SETTLE_POLLS 20000
#define MAX_N 100000u
#define WAIT_POLLS 2000000u
#define HALT_SETTLE_POLLS 100   /* let CPU 1 get back into hlt before the next IPI */

enum { PHASE_HALTED = 1, PHASE_POLLING = 2, PHASE_DONE = 3 };

static volatile u32 phase;
static volatile u32 received[4];
static u32 sent[4];
static u32 ids[2];
static u32 errors;

static void on_ipi(struct frame *f)
{
    received[f->vector - V_HALTED]++;
    apic_eoi();
}

void ap_main(u32 cpu)
{
    (void)cpu;
    for (;;) {
        u32 p = phase;

        if (p == PHASE_HALTED)
            asm volatile("sti; hlt" : : : "memory");
        else if (p == PHASE_POLLING) {
            sti();
            pause();
        } else if (p == PHASE_DONE)
            break;
        else
            pause();
    }
    cli();
}

static void print_phase(const char *name)
{
    u64 t = rdtsc();
    /* printf has no 64-bit decimal: print the TSC as two hex halves joined */
    printf("trace_ipi: phase %s tsc=0x%08x%08x\n", name, (u32)(t >> 32), (u32)t);
}

static void wait_count(u32 index, u32 want)
{
    u32 i;

    for (i = 0; i < WAIT_POLLS && received[index] < want; i++)
        pause();
    if (i == WAIT_POLLS) {
        printf("trace_ipi: timeout waiting for vector 0x%x (%u of %u)\n",
               V_HALTED + index, received[index], want);
        errors++;
    }
}

static void ipis(u32 vector, u32 n, u32 settle)
{
    u32 index = vector - V_HALTED;

    for (u32 k = 0; k < n; k++) {
        for (u32 i = 0; i < settle; i++)
            pause();
        sent[index]++;
        apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | vector, ids[1]);
        wait_count(index, sent[index]);
    }
}

static void bursts(u32 n, u32 b)
{
    u32 index = V_BURST - V_HALTED;

    for (u32 k = 0; k < n; k++) {
        u32 last, quiet = 0;

        for (u32 i = 0; i < HALT_SETTLE_POLLS; i++)
            pause();
        for (u32 i = 0; i < b; i++) {
            sent[index]++;
            apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | V_BURST, ids[1]);
        }
        last = received[index];
        while (quiet < BURST_SETTLE_POLLS) {   /* until nothing more arrives */
            pause();
            if (received[index] != last) {
                last = received[index];
                quiet = 0;
            } else
                quiet++;
        }
    }
}

static void timer_irqs(u32 t)
{
    apic_write(APIC_TIMER_DIVIDE, APIC_TIMER_DIVIDE_1);
    apic_write(APIC_LVT_TIMER, APIC_TIMER_ONESHOT | V_TIMER);
    for (u32 k = 0; k < t; k++) {
        sent[V_TIMER - V_HALTED]++;
        apic_write(APIC_TIMER_INITIAL, 200000);   /* 200 us at kvmpy's 1 GHz timer */
        wait_count(V_TIMER - V_HALTED, sent[V_TIMER - V_HALTED]);
    }
    apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
}

int main(struct multiboot_info *mbi)
{
    const char *cmdline = mbi_cmdline(mbi);
    const char *arg;
    u32 n = 20, t = 5, b = 0, x2 = 1;

    if ((arg = cmdline_value(cmdline, "n")))
        n = parse_u32(arg);
    if ((arg = cmdline_value(cmdline, "timer")))
        t = parse_u32(arg);
    if ((arg = cmdline_value(cmdline, "burst")))
        b = parse_u32(arg);
    if ((arg = cmdline_value(cmdline, "mode")) && !strncmp(arg, "xapic", 5))
        x2 = 0;
    if (n > MAX_N)
        n = MAX_N;
    if (apic_enable(x2 ? APIC_MODE_X2APIC : APIC_MODE_XAPIC)) {
        printf("trace_ipi: cannot enable the APIC\n");
        return 1;
    }
    for (u32 v = V_HALTED; v <= V_BURST; v++)
        apic_set_handler(v, on_ipi);
    if (smp_cpus_available() < 2 || smp_start(2) != 2) {
        printf("trace_ipi: need 2 cpus\n");
        return 1;
    }
    ids[0] = smp_apic_id(0);
    ids[1] = smp_apic_id(1);
    sti();

    phase = PHASE_HALTED;
    print_phase("halted");
    ipis(V_HALTED, n, HALT_SETTLE_POLLS);
    phase = PHASE_POLLING;
    print_phase("polling");
    ipis(V_POLLING, n, 0);
    phase = b ? PHASE_HALTED : PHASE_DONE;   /* CPU 1 halts for the bursts, or parks */
    print_phase("timer");
    timer_irqs(t);
    if (b) {
        print_phase("burst");
        bursts(n, b);
    }
    phase = PHASE_DONE;

    for (u32 v = V_HALTED; v <= (b ? V_BURST : V_TIMER); v++) {
        u32 i = v - V_HALTED;

        printf("trace_ipi: cpu %u vector 0x%x received %u sent %u\n", v == V_TIMER ? 0 : 1,
               v, received[i], sent[i]);
        if (v == V_BURST ? received[i] == 0 || received[i] > sent[i] : received[i] != sent[i])
            errors++;
    }
    if (errors) {
        printf("trace_ipi: FAILED (%u errors)\n", errors);
        return 1;
    }
    printf("trace_ipi: ok\n");
    return 0;
}
