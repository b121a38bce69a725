/* ipi_coalesce: what a sender pays for IPIs that find their vector still pending at the
 * target, the case docs/hacking.md's experiment (skip the kick) is about.
 *
 * Command line: "n=N" bursts (default 50, at most MAXN), "burst=B" IPIs per burst
 * (default 4, at most 64), "target=irqoff|poll|halt" (default irqoff), "mode=x2apic|xapic"
 * (default x2apic). Needs 2 CPUs. Where CPU 1 is while a burst arrives:
 *   irqoff  spinning in the guest with interrupts disabled (a kernel in a critical
 *           section): every IPI of the burst finds the first one still pending in IRR
 *           and merges with it (SDM 10.8.4); when the burst is over CPU 1 runs sti;hlt
 *           and takes the one interrupt. Exactly 1 received per burst.
 *   poll    spinning in the guest with interrupts enabled: a kick is a signal, and
 *           CPU 1 may take the first IPI before the next arrives (1 to B per burst)
 *   halt    waiting in sti;hlt: a kick is a wake-up (1 to B per burst)
 * CPU 0 sends B fixed IPIs of one vector to CPU 1 back to back and times the B ICR
 * writes with its TSC; then waits until CPU 1 has taken at least one and nothing more
 * arrives.
 * Output: "ipi_coalesce: cpus=2 mode=M target=T n=N burst=B", then
 *   "ipi_coalesce: sent S received R merged M"
 *   "ipi_coalesce: median burst_send CYCLES"   (the B ICR writes, sender's TSC)
 * and "ipi_coalesce: ok" with exit code 0 (1 if a burst was never received, CPU 1
 * received more interrupts than were sent, or with irqoff, not exactly one per burst).
 */
#include "apic.h"

#define VEC 0x50
#define MAXN 4096
#define MAXB 64
#define WAIT_POLLS 2000000u
#define QUIET_POLLS 300u      /* a burst is over when no interrupt came for this long */
#define HALT_SETTLE_POLLS 100 /* let CPU 1 get back into hlt before the next burst */

enum { IRQOFF, POLL, HALT };
static const char *const target_name[] = {"irqoff", "poll", "halt"};
static volatile u32 received, go, target, cpu1_ready, release;
static u32 samples[MAXN];
static u32 ids[2];

static void on_ipi(struct frame *f)
{
    (void)f;
    received++;
    apic_eoi();
}

void ap_main(u32 cpu)
{
    (void)cpu;
    while (!go)
        pause();
    for (;;) {
        if (target == HALT)
            asm volatile("sti; hlt" : : : "memory");
        else if (target == POLL) {
            sti();
            pause();
        } else {
            cli();
            cpu1_ready = 1;
            while (!release)
                pause();
            release = 0;
            asm volatile("sti; hlt" : : : "memory"); /* the merged IPI is taken here */
        }
    }
}

/* Wait until `received` passes `before`, then until it stays put: 0, or 1 on timeout. */
static int settle(u32 before)
{
    u32 i, quiet = 0, last;

    for (i = 0; i < WAIT_POLLS && received == before; i++)
        pause();
    if (i == WAIT_POLLS)
        return 1;
    last = received;
    while (quiet < QUIET_POLLS) {
        pause();
        if (received != last) {
            last = received;
            quiet = 0;
        } else
            quiet++;
    }
    return 0;
}

int main(struct multiboot_info *mbi)
{
    const char *cmdline = mbi_cmdline(mbi);
    const char *a;
    u32 n = 50, b = 4, x2 = 1, sent = 0, errors = 0;

    if ((a = cmdline_value(cmdline, "n")))
        n = parse_u32(a);
    if ((a = cmdline_value(cmdline, "burst")))
        b = parse_u32(a);
    if ((a = cmdline_value(cmdline, "mode")) && !strncmp(a, "xapic", 5))
        x2 = 0;
    target = IRQOFF;
    if ((a = cmdline_value(cmdline, "target")) && !strncmp(a, "halt", 4))
        target = HALT;
    else if (a && !strncmp(a, "poll", 4))
        target = POLL;
    if (n < 1 || n > MAXN || b < 1 || b > MAXB) {
        printf("ipi_coalesce: need 1 <= n <= %u and 1 <= burst <= %u\n", MAXN, MAXB);
        return 1;
    }
    if (apic_enable(x2 ? APIC_MODE_X2APIC : APIC_MODE_XAPIC)) {
        printf("ipi_coalesce: cannot enable the APIC\n");
        return 1;
    }
    apic_set_handler(VEC, on_ipi);
    if (smp_start(2) != 2) {
        printf("ipi_coalesce: CPU 1 did not come up\n");
        return 1;
    }
    ids[0] = smp_apic_id(0);
    ids[1] = smp_apic_id(1);
    printf("ipi_coalesce: cpus=2 mode=%s target=%s n=%u burst=%u\n", x2 ? "x2apic" : "xapic",
           target_name[target], n, b);
    go = 1;
    for (u32 k = 0; k < n; k++) {
        u32 before = received;
        u64 t0;

        for (u32 i = 0; i < HALT_SETTLE_POLLS && target == HALT; i++)
            pause();
        for (u32 i = 0; i < WAIT_POLLS && target == IRQOFF && !cpu1_ready; i++)
            pause();
        cpu1_ready = 0;
        t0 = rdtsc();
        for (u32 i = 0; i < b; i++)
            apic_send_ipi(APIC_DM_FIXED | APIC_INT_ASSERT | VEC, ids[1]);
        samples[k] = (u32)(rdtsc() - t0);
        sent += b;
        release = 1;
        if (settle(before)) {
            printf("ipi_coalesce: burst %u never received\n", k);
            errors++;
            break;
        }
    }
    printf("ipi_coalesce: sent %u received %u merged %u\n", sent, received, sent - received);
    if (received > sent || (target == IRQOFF && received != n))
        errors++;
    printf("ipi_coalesce: median burst_send %u\n", median_u32(samples, n));
    if (errors) {
        printf("ipi_coalesce: FAILED\n");
        return 1;
    }
    printf("ipi_coalesce: ok\n");
    return 0;
}
