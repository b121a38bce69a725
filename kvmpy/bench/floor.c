/*
 * kvmpy's floor: a bare KVM_RUN loop that handles nothing, for the ICR-write benchmark.
 *
 * It builds the VM kvmpy builds (kvmpy/machine.py _setup_vm, kvmpy/boot/cpu.py
 * setup_protected_mode): one vCPU, no in-kernel irqchip, KVM_CAP_X86_USER_SPACE_MSR with
 * INVAL|UNKNOWN|FILTER, an MSR filter denying IA32_APIC_BASE (0x1b) and TSC_DEADLINE
 * (0x6e0), RAM from guest-physical 0, the flat guest image at 1 MiB in 32-bit flat
 * protected mode with IF=0. Then it runs KVM_RUN in a loop: an MSR exit gets
 * msr.error = 0 (an IA32_APIC_BASE read returns 0xfee00900) and re-enters; the write to
 * port 0xf4 ends the loop; anything else is an error.
 *
 * Timestamps (CLOCK_MONOTONIC): around the whole loop, and per exit the KVM_RUN call and
 * return. For each WRMSR 0x830 exit: round trip = this KVM_RUN call to the next one,
 * handling = KVM_RUN returning to the next call. Percentiles use the rank rule of
 * kvmpy/trace.py Histogram.percentile (rank = max(1, round(count * p / 100))).
 *
 * usage: floor IMAGE MEMORY_BYTES TSC_GPA TSC_COUNT
 * Prints one JSON object on stdout; on error, one line on stderr and exit status 1.
 * TSC_GPA, TSC_COUNT: where the guest stores its TSC readings (u64s), and how many;
 * they are printed as "guest_tsc" for the caller to turn into round trips.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define LOAD_ADDRESS 0x100000u
#define BOOT_GDT_ADDRESS 0x500u
#define TSS_ADDRESS 0xfffbd000u
#define IDENTITY_MAP_ADDRESS 0xfffbc000ull
#define APIC_BASE_VALUE 0xfee00900ull /* kvmpy's reset value: xAPIC enabled, BSP */
#define MSR_APIC_BASE 0x1bu
#define MSR_TSC_DEADLINE 0x6e0u
#define MSR_X2APIC_ICR 0x830u
#define DEBUG_EXIT_PORT 0xf4u

static void die(const char *what)
{
	fprintf(stderr, "floor: %s: %s\n", what, errno ? strerror(errno) : "failed");
	exit(1);
}

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* kvmpy/trace.py Histogram.percentile's rank rule, on exact sorted samples. */
static uint64_t percentile(const uint64_t *sorted, size_t n, double p)
{
	if (!n)
		return 0;
	double r = n * p / 100.0;
	size_t rank = (size_t)(r + 0.5);
	if (r - (double)(size_t)r == 0.5 && ((size_t)r % 2 == 0))
		rank = (size_t)r; /* round half to even, as Python's round() */
	if (rank < 1)
		rank = 1;
	if (rank > n)
		rank = n;
	return sorted[rank - 1];
}

static struct kvm_segment flat_segment(uint16_t selector, uint8_t type)
{
	struct kvm_segment s = {
		.base = 0, .limit = 0xffffffffu, .selector = selector, .type = type,
		.present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1, .avl = 0,
		.unusable = 0,
	};
	return s;
}

static uint8_t *load_image(const char *path, size_t *size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		die(path);
	uint8_t *buf = malloc(st.st_size ? st.st_size : 1);
	if (!buf)
		die("malloc");
	size_t got = 0;
	while (got < (size_t)st.st_size) {
		ssize_t r = read(fd, buf + got, st.st_size - got);
		if (r <= 0)
			die(path);
		got += r;
	}
	close(fd);
	*size = got;
	return buf;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s IMAGE MEMORY_BYTES TSC_GPA TSC_COUNT\n", argv[0]);
		return 2;
	}
	size_t image_size;
	uint8_t *image = load_image(argv[1], &image_size);
	uint64_t mem_size = strtoull(argv[2], NULL, 0);
	uint64_t tsc_gpa = strtoull(argv[3], NULL, 0);
	uint64_t tsc_count = strtoull(argv[4], NULL, 0);
	if (mem_size < LOAD_ADDRESS + image_size || tsc_gpa > mem_size ||
	    tsc_count > (mem_size - tsc_gpa) / 8) {
		errno = 0;
		die("image or TSC readings do not fit in guest memory");
	}

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	uint64_t idmap = IDENTITY_MAP_ADDRESS;
	(void)ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &idmap); /* not needed everywhere */
	if (ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDRESS) < 0)
		die("KVM_SET_TSS_ADDR");

	struct kvm_enable_cap cap = { .cap = KVM_CAP_X86_USER_SPACE_MSR };
	cap.args[0] = KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN |
		      KVM_MSR_EXIT_REASON_FILTER;
	if (ioctl(vm, KVM_ENABLE_CAP, &cap) < 0)
		die("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)");

	/* kvmpy's VmFd.set_msr_filter: default allow, one 1-bit range (0 = deny) per MSR. */
	static uint8_t deny_bitmaps[2][8];
	struct kvm_msr_filter filter = { .flags = KVM_MSR_FILTER_DEFAULT_ALLOW };
	const uint32_t denied[2] = { MSR_APIC_BASE, MSR_TSC_DEADLINE };
	for (int i = 0; i < 2; i++) {
		filter.ranges[i].flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE;
		filter.ranges[i].nmsrs = 1;
		filter.ranges[i].base = denied[i];
		filter.ranges[i].bitmap = deny_bitmaps[i];
	}
	if (ioctl(vm, KVM_X86_SET_MSR_FILTER, &filter) < 0)
		die("KVM_X86_SET_MSR_FILTER");

	uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = mem_size,
		.userspace_addr = (uint64_t)(uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	memcpy(mem + LOAD_ADDRESS, image, image_size);
	const uint64_t gdt[3] = { 0, 0x00cf9b000000ffffull, 0x00cf93000000ffffull };
	memcpy(mem + BOOT_GDT_ADDRESS, gdt, sizeof(gdt));

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size < (int)sizeof(struct kvm_run))
		die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	/* kvmpy/boot/cpu.py setup_protected_mode (and kvmpy's APIC_BASE via SREGS). */
	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs = flat_segment(0x08, 0xb);
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = flat_segment(0x10, 0x3);
	sregs.gdt.base = BOOT_GDT_ADDRESS;
	sregs.gdt.limit = sizeof(gdt) - 1;
	sregs.idt.base = 0;
	sregs.idt.limit = 0;
	sregs.cr0 = 0x11; /* PE | ET */
	sregs.cr4 = 0;
	sregs.efer = 0;
	sregs.apic_base = APIC_BASE_VALUE;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = LOAD_ADDRESS, .rflags = 2 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
	int tsc_khz = ioctl(vcpu, KVM_GET_TSC_KHZ, 0);
	if (tsc_khz <= 0)
		die("KVM_GET_TSC_KHZ");

	size_t cap_samples = 1024, nsamples = 0;
	uint64_t *rt = malloc(cap_samples * sizeof(*rt));
	uint64_t *hd = malloc(cap_samples * sizeof(*hd));
	if (!rt || !hd)
		die("malloc");
	uint64_t exits = 0, rdmsr = 0, wrmsr = 0, icr = 0, io = 0, eintr = 0;
	uint64_t t_call = 0, t_ret = 0, prev_call = 0;
	int prev_icr = 0, done = 0;

	const uint64_t start = now_ns();
	while (!done) {
		t_call = now_ns();
		if (prev_icr) {
			if (nsamples == cap_samples) {
				cap_samples *= 2;
				rt = realloc(rt, cap_samples * sizeof(*rt));
				hd = realloc(hd, cap_samples * sizeof(*hd));
				if (!rt || !hd)
					die("realloc");
			}
			rt[nsamples] = t_call - prev_call;
			hd[nsamples] = t_call - t_ret;
			nsamples++;
		}
		prev_call = t_call;
		prev_icr = 0;
		int r = ioctl(vcpu, KVM_RUN, 0);
		t_ret = now_ns();
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN) {
				eintr++;
				continue;
			}
			die("KVM_RUN");
		}
		exits++;
		switch (run->exit_reason) {
		case KVM_EXIT_X86_RDMSR:
			rdmsr++;
			run->msr.error = 0;
			run->msr.data = run->msr.index == MSR_APIC_BASE ? APIC_BASE_VALUE : 0;
			break;
		case KVM_EXIT_X86_WRMSR:
			wrmsr++;
			run->msr.error = 0;
			if (run->msr.index == MSR_X2APIC_ICR) {
				icr++;
				prev_icr = 1;
			}
			break;
		case KVM_EXIT_IO:
			if (run->io.port != DEBUG_EXIT_PORT || run->io.direction != KVM_EXIT_IO_OUT) {
				fprintf(stderr, "floor: unexpected I/O exit, port %#x\n", run->io.port);
				return 1;
			}
			io++;
			done = 1;
			break;
		default:
			fprintf(stderr, "floor: unexpected exit reason %u\n", run->exit_reason);
			return 1;
		}
	}
	const uint64_t total = t_ret - start;

	/* What an ioctl other than KVM_RUN costs, after the loop: a vCPU ioctl pays
	 * vcpu_load/vcpu_put (a KVM_INTERRUPT per injection would; kvmpy queues interrupts
	 * in kvm_run.s.regs instead), a VM ioctl does not. */
	enum { IOCTL_SAMPLES = 1000 };
	static uint64_t vcpu_ioctl[IOCTL_SAMPLES], vm_ioctl[IOCTL_SAMPLES];
	struct kvm_vcpu_events events;
	for (int i = 0; i < IOCTL_SAMPLES; i++) {
		uint64_t t0 = now_ns();
		if (ioctl(vcpu, KVM_GET_VCPU_EVENTS, &events) < 0)
			die("KVM_GET_VCPU_EVENTS");
		uint64_t t1 = now_ns();
		if (ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS) < 0)
			die("KVM_CHECK_EXTENSION");
		uint64_t t2 = now_ns();
		vcpu_ioctl[i] = t1 - t0;
		vm_ioctl[i] = t2 - t1;
	}
	qsort(vcpu_ioctl, IOCTL_SAMPLES, sizeof(uint64_t), cmp_u64);
	qsort(vm_ioctl, IOCTL_SAMPLES, sizeof(uint64_t), cmp_u64);

	qsort(rt, nsamples, sizeof(*rt), cmp_u64);
	qsort(hd, nsamples, sizeof(*hd), cmp_u64);
	printf("{\"exits\": %" PRIu64 ", \"rdmsr_exits\": %" PRIu64 ", \"wrmsr_exits\": %" PRIu64
	       ", \"icr_exits\": %" PRIu64 ", \"io_exits\": %" PRIu64 ", \"eintr\": %" PRIu64
	       ", \"total_ns\": %" PRIu64 ", \"samples\": %zu"
	       ", \"rt_p50_ns\": %" PRIu64 ", \"rt_p99_ns\": %" PRIu64
	       ", \"handle_p50_ns\": %" PRIu64 ", \"handle_p99_ns\": %" PRIu64
	       ", \"vcpu_ioctl_p50_ns\": %" PRIu64 ", \"vm_ioctl_p50_ns\": %" PRIu64
	       ", \"tsc_khz\": %d, \"guest_tsc\": [",
	       exits, rdmsr, wrmsr, icr, io, eintr, total, nsamples,
	       percentile(rt, nsamples, 50), percentile(rt, nsamples, 99),
	       percentile(hd, nsamples, 50), percentile(hd, nsamples, 99),
	       percentile(vcpu_ioctl, IOCTL_SAMPLES, 50), percentile(vm_ioctl, IOCTL_SAMPLES, 50),
	       tsc_khz);
	for (uint64_t i = 0; i < tsc_count; i++) {
		uint64_t tsc;
		memcpy(&tsc, mem + tsc_gpa + 8 * i, sizeof(tsc));
		printf("%s%" PRIu64, i ? ", " : "", tsc);
	}
	printf("]}\n");
	return 0;
}
