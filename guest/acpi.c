/* acpi: reads the VMM's ACPI tables as an OS does (ACPI 6.3 section 5.2), and sleeps in
 * S3 and wakes on the RTC alarm (section 16).
 *
 * test=tables (the default): finds the RSDP on a 16-byte boundary in 0xE0000-0xFFFFF,
 * checks both its checksums, follows the XSDT, checks the RSDT lists the same tables,
 * checks every table's checksum, prints the MADT's entries and the FADT's fixed
 * hardware, checks the FACS and DSDT, starts every enabled processor the MADT lists by
 * INIT-SIPI-SIPI to its APIC ID and prints the ID each one reports, and times the PM
 * timer against 10 ms of PIT channel 2. Lines:
 *   rsdp at=%x rev=%u rsdt=%x xsdt=%x
 *   table sig=%s at=%x len=%u
 *   lapic uid=%u id=%u flags=%x / x2apic uid=%u id=%u flags=%x
 *   ioapic id=%u addr=%x gsi=%u / iso bus=%u irq=%u gsi=%u flags=%x
 *   madt lapic_addr=%x flags=%x
 *   fadt sci=%u smi_cmd=%x pm1a_evt=%x pm1_evt_len=%u pm1a_cnt=%x pm1_cnt_len=%u
 *        pm_tmr=%x pm_tmr_len=%u flags=%x boot_arch=%x century=%x
 *   facs at=%x len=%u version=%u / dsdt at=%x len=%u
 *   cpu %u apic id %u   (each CPU online, this one included)
 *   pmtimer ticks_in_10ms=%u
 * then "acpi: ok" and exit code 1; a failed check prints "acpi: FAIL <why>", code 2.
 *
 * test=s3 cpus=N: starts N CPUs (the APs count in a shared word), copies a real-mode
 * stub to 0x3000 and makes it the FACS waking vector, sets PM1_EN.RTC_EN and an RTC
 * alarm for the next second with AIE (as kvm-unit-tests' x86/s3.c), then writes
 * SLP_TYP=1 | SLP_EN to PM1a_CNT. The stub, entered in real mode after the wake-up,
 * exits with a bit mask: 1 the APs' counter did not move (they are stopped), 2 WAK_STS
 * and 4 RTC_STS set in PM1_STS, 8 the BSP did not run on after the sleep write (a word
 * it would have set is still 0), 16 CR0.PE is clear. All five: code 0x1f. With
 * "nowake", RTC_EN stays clear: nothing may wake the machine.
 *
 * test=s5: writes SLP_TYP=0 | SLP_EN (the DSDT's \_S5_): the VMM should power off; a
 * guest still running after it exits with code 2.
 */
#include "apic.h"

#define BIOS_START 0xe0000u
#define BIOS_END 0x100000u

#define S3_COUNTER 0x1f00u      /* the APs' counter, read by the real-mode stub */
#define S3_RAN_ON 0x1f04u       /* set if the BSP runs past the sleep write */
#define S3_PM1A_EVT 0x1f08u     /* the PM1a event block port, for the stub */
#define S3_RESUME 0x3000u       /* the waking vector: CS = 0x300, IP = 0 */

#define SLP_EN (1u << 13)
#define SLP_TYP_S3 (1u << 10)
#define PM1_WAK_STS (1u << 15)
#define PM1_RTC_STS (1u << 10)
#define PM1_RTC_EN (1u << 10)

#define RTC_SECONDS_ALARM 1
#define RTC_MINUTES_ALARM 3
#define RTC_HOURS_ALARM 5
#define RTC_REG_A 10
#define RTC_REG_B 11
#define RTC_REG_C 12
#define RTC_UIP 0x80
#define RTC_AIE 0x20

struct rsdp {
    char signature[8];
    u8 checksum;
    char oem_id[6];
    u8 revision;
    u32 rsdt;
    u32 length;
    u64 xsdt;
    u8 extended_checksum;
    u8 reserved[3];
} __attribute__((packed));

struct sdt {
    char signature[4];
    u32 length;
    u8 revision;
    u8 checksum;
    char oem_id[6];
    char oem_table_id[8];
    u32 oem_revision;
    u32 creator_id;
    u32 creator_revision;
} __attribute__((packed));

struct gas {
    u8 space, bit_width, bit_offset, access_size;
    u64 address;
} __attribute__((packed));

struct fadt {
    struct sdt h;
    u32 firmware_ctrl, dsdt;
    u8 reserved1, pm_profile;
    u16 sci_int;
    u32 smi_cmd;
    u8 acpi_enable, acpi_disable, s4bios_req, pstate_cnt;
    u32 pm1a_evt, pm1b_evt, pm1a_cnt, pm1b_cnt, pm2_cnt, pm_tmr, gpe0, gpe1;
    u8 pm1_evt_len, pm1_cnt_len, pm2_cnt_len, pm_tmr_len, gpe0_len, gpe1_len, gpe1_base;
    u8 cst_cnt;
    u16 p_lvl2_lat, p_lvl3_lat, flush_size, flush_stride;
    u8 duty_offset, duty_width, day_alarm, month_alarm, century;
    u16 boot_arch;
    u8 reserved2;
    u32 flags;
} __attribute__((packed));

struct facs {
    char signature[4];
    u32 length;
    u32 hardware_signature;
    u32 waking_vector;
    u32 global_lock;
    u32 flags;
    u64 x_waking_vector;
    u8 version;
} __attribute__((packed));

static int failed;

static void fail(const char *why)
{
    printf("acpi: FAIL %s\n", why);
    failed = 1;
}

static u8 sum(const void *p, u32 len)
{
    const u8 *b = p;
    u8 s = 0;

    for (u32 i = 0; i < len; i++)
        s += b[i];
    return s;
}

static const struct rsdp *find_rsdp(void)
{
    for (u32 a = BIOS_START; a < BIOS_END; a += 16)
        if (!memcmp((const void *)a, "RSD PTR ", 8))
            return (const struct rsdp *)a;
    return NULL;
}

static const struct sdt *find_table(const struct rsdp *rsdp, const char *sig)
{
    const struct sdt *xsdt = (const struct sdt *)(u32)rsdp->xsdt;
    const u64 *entry = (const u64 *)(xsdt + 1);
    u32 n = (xsdt->length - sizeof(*xsdt)) / 8;

    for (u32 i = 0; i < n; i++) {
        const struct sdt *t = (const struct sdt *)(u32)entry[i];
        if (!memcmp(t->signature, sig, 4))
            return t;
    }
    return NULL;
}

static void print_sig(const char *label, const struct sdt *t)
{
    printf("%s sig=%c%c%c%c at=%x len=%u\n", label, t->signature[0], t->signature[1],
           t->signature[2], t->signature[3], (u32)t, t->length);
}

static u32 walk_madt(const struct sdt *madt, u32 *ids, u32 max)
{
    const u8 *p = (const u8 *)madt + sizeof(*madt) + 8;
    const u8 *end = (const u8 *)madt + madt->length;
    u32 n = 0;

    printf("madt lapic_addr=%x flags=%x\n", *(const u32 *)(madt + 1),
           *((const u32 *)(madt + 1) + 1));
    while (p + 2 <= end && p[1] >= 2 && p + p[1] <= end) {
        switch (p[0]) {
        case 0:
            printf("lapic uid=%u id=%u flags=%x\n", p[2], p[3], *(const u32 *)(p + 4));
            if ((*(const u32 *)(p + 4) & 1) && n < max)
                ids[n++] = p[3];
            break;
        case 9:
            printf("x2apic uid=%u id=%u flags=%x\n", *(const u32 *)(p + 12),
                   *(const u32 *)(p + 4), *(const u32 *)(p + 8));
            if ((*(const u32 *)(p + 8) & 1) && n < max)
                ids[n++] = *(const u32 *)(p + 4);
            break;
        case 1:
            printf("ioapic id=%u addr=%x gsi=%u\n", p[2], *(const u32 *)(p + 4),
                   *(const u32 *)(p + 8));
            break;
        case 2:
            printf("iso bus=%u irq=%u gsi=%u flags=%x\n", p[2], p[3], *(const u32 *)(p + 4),
                   *(const u16 *)(p + 8));
            break;
        default:
            printf("madt entry type=%u len=%u\n", p[0], p[1]);
        }
        p += p[1];
    }
    if (p != end)
        fail("MADT entries do not end at the table's end");
    return n;
}

/* PM timer ticks in 10 ms of PIT channel 2 (mode 0, gate through port 0x61). */
static u32 pm_ticks_in_10ms(u16 pm_tmr)
{
    u32 start, end;

    outb(0x61, (inb(0x61) & ~0x02) | 0x01);     /* gate 2 high, speaker off */
    outb(0x43, 0xb0);                            /* channel 2, lobyte/hibyte, mode 0 */
    outb(0x42, 11932 & 0xff);                    /* 10 ms at 1.193182 MHz */
    start = inl(pm_tmr);
    outb(0x42, 11932 >> 8);
    while (!(inb(0x61) & 0x20))
        ;
    end = inl(pm_tmr);
    return (end - start) & 0xffffff;
}

static int test_tables(void)
{
    const struct rsdp *rsdp = find_rsdp();
    const struct sdt *xsdt, *rsdt, *madt, *dsdt;
    const struct fadt *fadt;
    const struct facs *facs;
    u32 ids[KVMPY_MAX_CPUS], nids, n;

    if (!rsdp) {
        fail("no RSDP in 0xE0000-0xFFFFF");
        return 2;
    }
    printf("rsdp at=%x rev=%u rsdt=%x xsdt=%x\n", (u32)rsdp, rsdp->revision, rsdp->rsdt,
           (u32)rsdp->xsdt);
    if (sum(rsdp, 20))
        fail("RSDP checksum");
    if (rsdp->revision < 2 || rsdp->length != 36 || sum(rsdp, 36))
        fail("RSDP extended checksum or length");
    xsdt = (const struct sdt *)(u32)rsdp->xsdt;
    rsdt = (const struct sdt *)rsdp->rsdt;
    if (memcmp(xsdt->signature, "XSDT", 4) || sum(xsdt, xsdt->length))
        fail("XSDT signature or checksum");
    if (memcmp(rsdt->signature, "RSDT", 4) || sum(rsdt, rsdt->length))
        fail("RSDT signature or checksum");
    n = (xsdt->length - sizeof(*xsdt)) / 8;
    if ((rsdt->length - sizeof(*rsdt)) / 4 != n)
        fail("RSDT and XSDT list different numbers of tables");
    for (u32 i = 0; i < n; i++) {
        const struct sdt *t = (const struct sdt *)(u32)((const u64 *)(xsdt + 1))[i];
        print_sig("table", t);
        if (sum(t, t->length))
            fail("a table's checksum");
        if ((u32)t != ((const u32 *)(rsdt + 1))[i])
            fail("RSDT and XSDT entries differ");
    }
    madt = find_table(rsdp, "APIC");
    fadt = (const struct fadt *)find_table(rsdp, "FACP");
    if (!madt || !fadt) {
        fail("no MADT or FADT");
        return 2;
    }
    nids = walk_madt(madt, ids, KVMPY_MAX_CPUS);
    printf("fadt sci=%u smi_cmd=%x pm1a_evt=%x pm1_evt_len=%u pm1a_cnt=%x pm1_cnt_len=%u "
           "pm_tmr=%x pm_tmr_len=%u flags=%x boot_arch=%x century=%x\n",
           fadt->sci_int, fadt->smi_cmd, fadt->pm1a_evt, fadt->pm1_evt_len, fadt->pm1a_cnt,
           fadt->pm1_cnt_len, fadt->pm_tmr, fadt->pm_tmr_len, fadt->flags, fadt->boot_arch,
           fadt->century);
    facs = (const struct facs *)fadt->firmware_ctrl;
    dsdt = (const struct sdt *)fadt->dsdt;
    printf("facs at=%x len=%u version=%u\n", (u32)facs, facs->length, facs->version);
    if (memcmp(facs->signature, "FACS", 4) || ((u32)facs & 63))
        fail("FACS signature or 64-byte alignment");
    print_sig("dsdt", dsdt);
    if (memcmp(dsdt->signature, "DSDT", 4) || sum(dsdt, dsdt->length))
        fail("DSDT signature or checksum");

    n = smp_start_ids(ids, nids);
    if (n != nids)
        fail("not every processor in the MADT came online");
    for (u32 cpu = 0; cpu < n; cpu++)
        printf("cpu %u apic id %u\n", cpu, smp_apic_id(cpu));
    printf("pmtimer ticks_in_10ms=%u\n", pm_ticks_in_10ms(fadt->pm_tmr));
    if (failed)
        return 2;
    printf("acpi: ok\n");
    return 1;
}

/* ---- S3 ---- */

extern char s3_resume_start[], s3_resume_end[];

asm(".pushsection .text\n"
    ".globl s3_resume_start, s3_resume_end\n"
    ".code16\n"
    "s3_resume_start:\n"
    "    movl 0x1f00, %ebx\n"           /* S3_COUNTER (DS = 0) */
    "    movw $20000, %cx\n"
    "1:  decw %cx\n"
    "    jnz 1b\n"
    "    xorw %si, %si\n"
    "    cmpl 0x1f00, %ebx\n"
    "    jne 2f\n"
    "    orw $1, %si\n"
    "2:  movw 0x1f08, %dx\n"            /* S3_PM1A_EVT: PM1_STS */
    "    inw %dx, %ax\n"
    "    testw $0x8000, %ax\n"
    "    jz 3f\n"
    "    orw $2, %si\n"
    "3:  testw $0x400, %ax\n"
    "    jz 4f\n"
    "    orw $4, %si\n"
    "4:  cmpl $0, 0x1f04\n"             /* S3_RAN_ON */
    "    jne 5f\n"
    "    orw $8, %si\n"
    "5:  smsw %ax\n"
    "    testw $1, %ax\n"
    "    jnz 6f\n"
    "    orw $0x10, %si\n"
    "6:  movw %si, %ax\n"
    "    movw $0xf4, %dx\n"
    "    outw %ax, %dx\n"
    "7:  hlt\n"
    "    jmp 7b\n"
    "s3_resume_end:\n"
    ".code32\n"
    ".popsection\n");

static u8 rtc_in(u8 reg)
{
    outb(0x70, reg);
    return inb(0x71);
}

static void rtc_out(u8 reg, u8 val)
{
    outb(0x70, reg);
    outb(0x71, val);
}

void ap_main(u32 cpu)
{
    (void)cpu;
    for (;;)
        __sync_fetch_and_add((volatile u32 *)S3_COUNTER, 1);
}

/* SLP_TYP 0 (the DSDT's \_S5_) with SLP_EN: the VMM powers off; if it does not, the
 * guest exits with code 2. */
static int test_s5(void)
{
    const struct rsdp *rsdp = find_rsdp();
    const struct fadt *fadt;

    if (!rsdp || !(fadt = (const struct fadt *)find_table(rsdp, "FACP"))) {
        fail("no FADT");
        return 2;
    }
    outw(fadt->pm1a_cnt, SLP_EN);
    fail("still running after S5");
    return 2;
}

static int test_s3(u32 cpus, int wake)
{
    const struct rsdp *rsdp = find_rsdp();
    const struct fadt *fadt;
    struct facs *facs;

    if (!rsdp || !(fadt = (const struct fadt *)find_table(rsdp, "FACP"))) {
        fail("no FADT");
        return 2;
    }
    facs = (struct facs *)fadt->firmware_ctrl;
    *(volatile u32 *)S3_COUNTER = 0;
    *(volatile u32 *)S3_RAN_ON = 0;
    *(volatile u32 *)S3_PM1A_EVT = fadt->pm1a_evt;
    if (smp_start(cpus) != cpus) {
        fail("not every CPU came online");
        return 2;
    }
    if (cpus > 1) {
        for (u32 i = 0; i < 1000000 && *(volatile u32 *)S3_COUNTER < 10; i++)
            pause();
        if (*(volatile u32 *)S3_COUNTER < 10) {
            fail("the APs do not count");
            return 2;
        }
    }
    memcpy((void *)S3_RESUME, s3_resume_start, s3_resume_end - s3_resume_start);
    facs->waking_vector = S3_RESUME;
    outw(fadt->pm1a_evt, PM1_WAK_STS | PM1_RTC_STS);        /* clear (write 1) */
    outw(fadt->pm1a_evt + 2, wake ? PM1_RTC_EN : 0);

    /* The alarm for the next second, right after an update (x86/s3.c's sequence). */
    while (!(rtc_in(RTC_REG_A) & RTC_UIP))
        ;
    while (rtc_in(RTC_REG_A) & RTC_UIP)
        ;
    rtc_in(RTC_REG_C);
    rtc_out(RTC_SECONDS_ALARM, 0xc0);
    rtc_out(RTC_MINUTES_ALARM, 0xc0);
    rtc_out(RTC_HOURS_ALARM, 0xc0);
    rtc_out(RTC_REG_B, rtc_in(RTC_REG_B) | RTC_AIE);
    printf("acpi: sleeping in S3 on %u cpus\n", cpus);

    outw(fadt->pm1a_cnt, SLP_TYP_S3 | SLP_EN);
    for (;;)
        *(volatile u32 *)S3_RAN_ON = 1;
}

int main(struct multiboot_info *mbi)
{
    const char *cmdline = mbi_cmdline(mbi);
    const char *test = cmdline_value(cmdline, "test");
    const char *cpus = cmdline_value(cmdline, "cpus");

    if (test && !strncmp(test, "s3", 2))
        return test_s3(cpus ? parse_u32(cpus) : 1, !cmdline_value(cmdline, "nowake"));
    if (test && !strncmp(test, "s5", 2))
        return test_s5();
    return test_tables();
}
