/* timer_storm: a periodic APIC timer whose period (initial count 1, divide by 1: 1 ns)
 * is far shorter than any exit's round trip must not stop the guest (SDM 10.5.4: the
 * timer only sets the IRR bit; the CPU still executes between interrupts). KVM clamps
 * such a period to min_timer_period_us (limit_periodic_timer_frequency); a VMM that
 * does not must still enter the guest after each injection, or the guest never runs
 * again while the host spins.
 *
 * The handler counts ticks and stops the timer at the STORM_TICKS-th; the main loop
 * spins meanwhile. Prints "timer_storm: ticks=N" (N >= STORM_TICKS: one more may have
 * been pending when the timer stopped) and exits 0. Cmdline "mode=x2apic" runs it in
 * x2APIC mode.
 */
#include "apic.h"

#define V_TIMER 0x60
#define STORM_TICKS 200

static volatile u32 ticks;

static void on_timer(struct frame *f)
{
    (void)f;
    if (++ticks == STORM_TICKS)
        apic_write(APIC_TIMER_INITIAL, 0);
    apic_eoi();
}

int main(struct multiboot_info *mbi)
{
    const char *mode = cmdline_value(mbi_cmdline(mbi), "mode");
    enum apic_mode want = mode && !strncmp(mode, "x2apic", 6) ? APIC_MODE_X2APIC
                                                             : APIC_MODE_XAPIC;

    if (apic_enable(want)) {
        printf("timer_storm: cannot enable the APIC\n");
        return 2;
    }
    apic_set_handler(V_TIMER, on_timer);
    apic_write(APIC_TIMER_DIVIDE, APIC_TIMER_DIVIDE_1);
    apic_write(APIC_LVT_TIMER, APIC_TIMER_PERIODIC | V_TIMER);
    sti();
    apic_write(APIC_TIMER_INITIAL, 1);
    while (ticks < STORM_TICKS)
        pause();
    cli();
    printf("timer_storm: ticks=%u %s\n", ticks, apic_mode_name(apic_mode()));
    return 0;
}
