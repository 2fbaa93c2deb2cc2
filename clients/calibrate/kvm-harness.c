/*
 * kvm-harness: measures this host's KVM dirty-logging costs by driving
 * /dev/kvm directly, for `migration-controller calibrate` (calibrate.ts
 * compiles it with `cc -O2 -pthread` and reads its JSON from stdout).
 *
 * The guest is a loop at CPL3 in 64-bit long mode with IOPL=3: under kvm_pvm
 * (shadow paging) a CPL0 guest is run by KVM's instruction emulator and its
 * stores dirty pages without any write-protection fault, so it would measure
 * nothing about dirty logging (shared/reference/real-kvm-measurements.md).
 * KVM's own statistics (pf_fixed, insn_emulation) are read around the
 * fault passes to prove which case this is.
 *
 * Guest physical layout: slot 0 at GPA 0 (2 MiB: code, page tables, GDT),
 * the measured slot 1 at GPA 1 GiB. The guest writes one word into every
 * stride-th page of [rdi, rsi) (stride in rdx), then `out` to port 0x10, and
 * starts over when re-entered.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MIB (1UL << 20)
#define LOW_SIZE (2 * MIB)
#define SLOT_GPA (1UL << 30)
#define CODE_GPA 0x1000UL
#define PML4_GPA 0x2000UL
#define PDPT_GPA 0x3000UL
#define PD_GPA 0x4000UL /* two PDs: 0x4000 and 0x5000 map [0, 2 GiB) */
#define GDT_GPA 0x8000UL
#define TSS_GPA 0x9000UL
#define EPOCH_GPA 0x7000UL /* the race phase's iteration, which its guest loop writes */
#define EPOCH_CODE_GPA 0x1800UL
#define EXIT_PORT 0x10
#define MAX_SAMPLES 4096
#define MAX_VCPUS 2
#ifndef KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
#define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP 225 /* Linux 6.3; older uapi headers lack it */
#endif

extern const unsigned char guest_loop[], guest_loop_end[];
__asm__(".pushsection .rodata\n"
        "guest_loop:\n"
        "1: mov %rdi, %rax\n"
        "2: movq %rax, (%rax)\n"
        "   add %rdx, %rax\n"
        "   cmp %rsi, %rax\n"
        "   jb 2b\n"
        "   out %al, $0x10\n"
        "   jmp 1b\n"
        "guest_loop_end:\n"
        ".popsection\n");

/* The race phase's guest: the same loop, storing the iteration the host keeps at EPOCH_GPA. */
extern const unsigned char guest_epoch_loop[], guest_epoch_loop_end[];
__asm__(".pushsection .rodata\n"
        "guest_epoch_loop:\n"
        "1: mov %rdi, %rax\n"
        "2: mov 0x7000, %rbx\n"
        "   movq %rbx, (%rax)\n"
        "   add %rdx, %rax\n"
        "   cmp %rsi, %rax\n"
        "   jb 2b\n"
        "   out %al, $0x10\n"
        "   jmp 1b\n"
        "guest_epoch_loop_end:\n"
        ".popsection\n");

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "kvm-harness: ");
  vfprintf(stderr, fmt, ap);
  if (errno) fprintf(stderr, ": %s", strerror(errno));
  fputc('\n', stderr);
  va_end(ap);
  exit(1);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

struct vcpu {
  int fd, stats_fd;
  struct kvm_run *run;
  struct kvm_dirty_gfn *ring;
  uint32_t ring_entries, ring_next;
  uint64_t first, end; /* the range this vCPU writes */
  uint64_t entry;       /* the guest loop it runs */
};

struct vm {
  int fd;
  uint8_t *low, *mem;
  size_t size, pages;
  uint32_t slot_flags;
  int nvcpus;
  struct vcpu cpu[MAX_VCPUS];
};

static int kvm_fd;
static size_t run_size;
static struct kvm_cpuid2 *cpuid;

/* Pages the dirty log reported, against pages the guest wrote: a lost page fails calibration. */
static uint64_t lost_pages;

static void set_slot(struct vm *vm, uint32_t flags) {
  struct kvm_userspace_memory_region r = {.slot = 1, .flags = flags, .guest_phys_addr = SLOT_GPA, .memory_size = vm->size, .userspace_addr = (uintptr_t)vm->mem};
  if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) die("KVM_SET_USER_MEMORY_REGION flags %u", flags);
  vm->slot_flags = flags;
}

static void write_guest_tables(uint8_t *low) {
  memcpy(low + CODE_GPA, guest_loop, guest_loop_end - guest_loop);
  memcpy(low + EPOCH_CODE_GPA, guest_epoch_loop, guest_epoch_loop_end - guest_epoch_loop);
  uint64_t *pml4 = (uint64_t *)(low + PML4_GPA), *pdpt = (uint64_t *)(low + PDPT_GPA), *pd = (uint64_t *)(low + PD_GPA);
  /* Present, writable, user, accessed; the 2 MiB leaves dirty too, so the guest never updates its own tables. */
  pml4[0] = PDPT_GPA | 0x27;
  pdpt[0] = PD_GPA | 0x27;
  pdpt[1] = (PD_GPA + PAGE) | 0x27;
  for (uint64_t i = 0; i < 1024; i++) pd[i] = (i << 21) | 0xe7;
  uint64_t *gdt = (uint64_t *)(low + GDT_GPA);
  gdt[1] = 0x00af9b000000ffffULL; /* kernel code64 */
  gdt[2] = 0x00cf93000000ffffULL; /* kernel data */
  gdt[3] = 0x00affb000000ffffULL; /* user code64, DPL3 */
  gdt[4] = 0x00cff3000000ffffULL; /* user data, DPL3 */
  gdt[5] = 0x0000890000000067ULL | ((TSS_GPA & 0xffffff) << 16); /* 64-bit TSS (two slots) */
}

static void setup_vcpu(struct vm *vm, int i) {
  struct vcpu *c = &vm->cpu[i];
  c->fd = ioctl(vm->fd, KVM_CREATE_VCPU, i);
  if (c->fd < 0) die("KVM_CREATE_VCPU");
  if (ioctl(c->fd, KVM_SET_CPUID2, cpuid) < 0) die("KVM_SET_CPUID2");
  c->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, 0);
  if (c->run == MAP_FAILED) die("mmap kvm_run");
  if (c->ring_entries) {
    c->ring = mmap(NULL, c->ring_entries * sizeof(struct kvm_dirty_gfn), PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, KVM_DIRTY_LOG_PAGE_OFFSET * PAGE);
    if (c->ring == MAP_FAILED) die("mmap dirty ring");
  }
  c->stats_fd = ioctl(c->fd, KVM_GET_STATS_FD, NULL);
  struct kvm_sregs s;
  if (ioctl(c->fd, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
  struct kvm_segment code = {.base = 0, .limit = 0xffffffff, .selector = 0x1b, .type = 11, .present = 1, .dpl = 3, .db = 0, .s = 1, .l = 1, .g = 1};
  struct kvm_segment data = {.base = 0, .limit = 0xffffffff, .selector = 0x23, .type = 3, .present = 1, .dpl = 3, .db = 1, .s = 1, .l = 0, .g = 1};
  s.cs = code;
  s.ds = s.es = s.fs = s.gs = s.ss = data;
  s.tr = (struct kvm_segment){.base = TSS_GPA, .limit = 0x67, .selector = 0x28, .type = 11, .present = 1, .s = 0};
  s.ldt = (struct kvm_segment){.selector = 0, .type = 2, .present = 1, .unusable = 1};
  s.gdt.base = GDT_GPA;
  s.gdt.limit = 7 * 8 - 1;
  s.cr0 = 0x80050033; /* PG, AM, WP, NE, ET, MP, PE */
  s.cr3 = PML4_GPA;
  s.cr4 = 0x20; /* PAE */
  s.efer = 0x500; /* LME, LMA */
  if (ioctl(c->fd, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
}

static void set_range(struct vcpu *c, uint64_t first_page, uint64_t end_page, uint64_t stride) {
  struct kvm_regs r = {0};
  r.rip = c->entry ? c->entry : CODE_GPA;
  r.rflags = 0x3002; /* IOPL=3 so that the CPL3 loop may `out`; interrupts off */
  r.rdi = SLOT_GPA + first_page * PAGE;
  r.rsi = SLOT_GPA + end_page * PAGE;
  r.rdx = stride * PAGE;
  c->first = first_page;
  c->end = end_page;
  if (ioctl(c->fd, KVM_SET_REGS, &r) < 0) die("KVM_SET_REGS");
}

static struct vm *create_vm(size_t size, int nvcpus, uint32_t ring_entries, uint64_t manual_flags, int thp) {
  struct vm *vm = calloc(1, sizeof *vm);
  vm->fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
  if (vm->fd < 0) die("KVM_CREATE_VM");
  ioctl(vm->fd, KVM_SET_TSS_ADDR, 0xfffbd000UL);
  if (ring_entries) {
    struct kvm_enable_cap cap = {.cap = KVM_CAP_DIRTY_LOG_RING, .args = {ring_entries * sizeof(struct kvm_dirty_gfn)}};
    if (ioctl(vm->fd, KVM_ENABLE_CAP, &cap) < 0) die("KVM_ENABLE_CAP DIRTY_LOG_RING %u entries", ring_entries);
  }
  if (manual_flags) {
    struct kvm_enable_cap cap = {.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, .args = {manual_flags}};
    if (ioctl(vm->fd, KVM_ENABLE_CAP, &cap) < 0) die("KVM_ENABLE_CAP MANUAL_DIRTY_LOG_PROTECT2");
  }
  vm->low = mmap(NULL, LOW_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  /* 2 MiB-aligned backing, so that THP (when asked) can back whole blocks. */
  uint8_t *raw = mmap(NULL, size + 2 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (vm->low == MAP_FAILED || raw == MAP_FAILED) die("mmap guest memory");
  vm->mem = (uint8_t *)(((uintptr_t)raw + 2 * MIB - 1) & ~(2 * MIB - 1));
  madvise(vm->mem, size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  vm->size = size;
  vm->pages = size / PAGE;
  write_guest_tables(vm->low);
  struct kvm_userspace_memory_region low = {.slot = 0, .guest_phys_addr = 0, .memory_size = LOW_SIZE, .userspace_addr = (uintptr_t)vm->low};
  if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &low) < 0) die("KVM_SET_USER_MEMORY_REGION slot 0");
  set_slot(vm, 0);
  vm->nvcpus = nvcpus;
  for (int i = 0; i < nvcpus; i++) {
    vm->cpu[i].ring_entries = ring_entries;
    setup_vcpu(vm, i);
    uint64_t per = vm->pages / nvcpus;
    set_range(&vm->cpu[i], i * per, (i + 1) * per, 1);
  }
  return vm;
}

static void destroy_vm(struct vm *vm) {
  for (int i = 0; i < vm->nvcpus; i++) {
    munmap(vm->cpu[i].run, run_size);
    if (vm->cpu[i].ring) munmap(vm->cpu[i].ring, vm->cpu[i].ring_entries * sizeof(struct kvm_dirty_gfn));
    if (vm->cpu[i].stats_fd >= 0) close(vm->cpu[i].stats_fd);
    close(vm->cpu[i].fd);
  }
  close(vm->fd);
  munmap(vm->low, LOW_SIZE);
  munmap(vm->mem, vm->size);
  free(vm);
}

/* One of KVM's binary statistics of a vCPU, by name; -1 when this KVM has no such stat. */
static int64_t vcpu_stat(struct vcpu *c, const char *name) {
  struct kvm_stats_header h;
  if (c->stats_fd < 0 || pread(c->stats_fd, &h, sizeof h, 0) != sizeof h) return -1;
  size_t dsize = sizeof(struct kvm_stats_desc) + h.name_size;
  char *buf = malloc(dsize * h.num_desc);
  int64_t out = -1;
  if (pread(c->stats_fd, buf, dsize * h.num_desc, h.desc_offset) == (ssize_t)(dsize * h.num_desc)) {
    for (uint32_t i = 0; i < h.num_desc; i++) {
      struct kvm_stats_desc *d = (struct kvm_stats_desc *)(buf + i * dsize);
      uint64_t v;
      if (strcmp(d->name, name) == 0 && pread(c->stats_fd, &v, sizeof v, h.data_offset + d->offset) == sizeof v) {
        out = (int64_t)v;
        break;
      }
    }
  }
  free(buf);
  return out;
}

struct ring_tally {
  uint64_t entries, harvest_ns, reset_ns, full_exits;
  uint8_t *seen; /* one byte per page of slot 1 */
};

/* Collects a vCPU's dirty ring (01 -> 1X, in order), then KVM_RESET_DIRTY_RINGS. */
static void reap_ring(struct vm *vm, struct vcpu *c, struct ring_tally *t) {
  uint64_t t0 = now_ns(), n = 0;
  for (;;) {
    struct kvm_dirty_gfn *e = &c->ring[c->ring_next % c->ring_entries];
    if (!(__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY)) break;
    if (e->slot == 1 && e->offset < vm->pages) t->seen[e->offset] = 1;
    __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
    c->ring_next++;
    n++;
  }
  uint64_t t1 = now_ns();
  if (n && ioctl(vm->fd, KVM_RESET_DIRTY_RINGS, 0) < 0) die("KVM_RESET_DIRTY_RINGS");
  t->reset_ns += n ? now_ns() - t1 : 0;
  t->harvest_ns += t1 - t0;
  t->entries += n;
}

/* Runs a vCPU through one pass of its range; a full ring is reaped and the vCPU re-entered. */
static uint64_t run_pass(struct vm *vm, struct vcpu *c, struct ring_tally *t) {
  uint64_t t0 = now_ns();
  for (;;) {
    if (ioctl(c->fd, KVM_RUN, 0) < 0) die("KVM_RUN");
    struct kvm_run *r = c->run;
    if (r->exit_reason == KVM_EXIT_IO && r->io.port == EXIT_PORT) break;
    if (r->exit_reason == KVM_EXIT_DIRTY_RING_FULL && t) {
      t->full_exits++;
      reap_ring(vm, c, t);
      continue;
    }
    errno = 0;
    die("unexpected exit %u (8 = shutdown: the guest faulted)", r->exit_reason);
  }
  return now_ns() - t0;
}

struct pass_arg {
  struct vm *vm;
  struct vcpu *c;
  uint64_t ns;
};

static void *pass_thread(void *p) {
  struct pass_arg *a = p;
  a->ns = run_pass(a->vm, a->c, NULL);
  return NULL;
}

static volatile int race_stop;
/* The race phase's totals over its iterations (after the first). */
static uint64_t race_changed_total, race_late_total;

static void *race_thread(void *p) {
  struct pass_arg *a = p;
  while (!race_stop) run_pass(a->vm, a->c, NULL);
  return NULL;
}

static uint64_t *get_log(struct vm *vm, uint64_t *ns) {
  uint64_t *bm = calloc(vm->pages / 64 + 1, 8);
  struct kvm_dirty_log log = {.slot = 1, .dirty_bitmap = bm};
  uint64_t t0 = now_ns();
  if (ioctl(vm->fd, KVM_GET_DIRTY_LOG, &log) < 0) die("KVM_GET_DIRTY_LOG");
  *ns = now_ns() - t0;
  return bm;
}

/* Counts the pages of [first, end) step stride that the bitmap misses. */
static void check_bitmap(const uint64_t *bm, uint64_t first, uint64_t end, uint64_t stride) {
  for (uint64_t p = first; p < end; p += stride)
    if (!(bm[p / 64] >> (p % 64) & 1)) lost_pages++;
}

/* --- samples and JSON --- */

struct series {
  const char *name, *what;
  uint64_t n;
  double v[MAX_SAMPLES];
};

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static void add(struct series *s, double v) {
  if (s->n < MAX_SAMPLES) s->v[s->n++] = v;
}

static int first_series = 1;
static void emit(struct series *s) {
  if (!s->n) return;
  qsort(s->v, s->n, sizeof(double), cmp_double);
  double med = s->n % 2 ? s->v[s->n / 2] : (s->v[s->n / 2 - 1] + s->v[s->n / 2]) / 2;
  printf("%s\n    \"%s\": {\"what\": \"%s\", \"samples\": %lu, \"min\": %.3f, \"median\": %.3f, \"max\": %.3f}", first_series ? "" : ",", s->name, s->what,
         (unsigned long)s->n, s->v[0], med, s->v[s->n - 1]);
  first_series = 0;
}

#define SERIES(id, what_) static struct series id = {.name = #id, .what = what_}

SERIES(write_ns_per_page, "guest write to a writable, mapped page, logging off (ns per page)");
SERIES(first_touch_ns_per_page, "first write to a page never mapped, logging off (ns per page)");
SERIES(write_fault_ns_per_page, "first write after protection while logging: fault, fix-up and write (ns per page)");
SERIES(enable_logging_ns, "KVM_MEM_LOG_DIRTY_PAGES on, every page mapped at 4 KiB (ns per call)");
SERIES(disable_logging_ns, "KVM_MEM_LOG_DIRTY_PAGES off (ns per call)");
SERIES(enable_logging_thp_ns, "logging on, THP backing, every page touched (ns per call)");
SERIES(disable_logging_thp_ns, "logging off, THP backing (ns per call)");
SERIES(enable_logging_initially_set_ns, "logging on with KVM_DIRTY_LOG_INITIALLY_SET (ns per call)");
SERIES(get_all_dirty_ns, "KVM_GET_DIRTY_LOG, every page dirty (ns per call)");
SERIES(get_none_dirty_ns, "KVM_GET_DIRTY_LOG, no page dirty (ns per call)");
SERIES(get_sparse_ns, "KVM_GET_DIRTY_LOG, one page dirty in each 64-page word (ns per call)");
SERIES(get_sparse8_ns, "KVM_GET_DIRTY_LOG, one page dirty in each 512 pages (ns per call)");
SERIES(enable_logging_sparse_ns, "KVM_MEM_LOG_DIRTY_PAGES on, one page in 8 ever mapped (ns per call)");
SERIES(enable_logging_sparse64_ns, "KVM_MEM_LOG_DIRTY_PAGES on, one page in 64 ever mapped (ns per call)");
SERIES(disable_logging_thp_sparse_ns, "logging off, THP backing, after a logging pass over one page in 8 (ns per call)");
SERIES(ring_reset_scattered_ns_per_entry, "dirty ring: KVM_RESET_DIRTY_RINGS of entries 65 pages apart (ns per entry)");
SERIES(manual_get_all_dirty_ns, "manual protect: KVM_GET_DIRTY_LOG, every page dirty (ns per call)");
SERIES(clear_slot_ns, "manual protect: KVM_CLEAR_DIRTY_LOG of the whole slot, every page dirty (ns per call)");
SERIES(clear_64_pages_ns, "manual protect: KVM_CLEAR_DIRTY_LOG of one 64-page chunk, every page dirty (ns per call)");
SERIES(ring_harvest_ns_per_entry, "dirty ring: userspace harvest (ns per entry)");
SERIES(ring_reset_ns_per_entry, "dirty ring: KVM_RESET_DIRTY_RINGS (ns per entry)");
SERIES(ring_pass_ns_per_page, "dirty ring large enough for the slot: a logging pass (ns per page, harvest excluded)");
SERIES(small_ring_pass_ns_per_page, "small dirty ring: a logging pass with its ring-full exits, reap included (ns per page)");
SERIES(small_ring_full_exits, "small dirty ring: KVM_EXIT_DIRTY_RING_FULL exits per pass");
SERIES(two_vcpu_fault_ns_per_page, "two vCPUs faulting at once: per vCPU (ns per page it wrote)");
SERIES(two_vcpu_fault_aggregate_ns_per_page, "two vCPUs faulting at once: the VM (wall ns per page written)");
SERIES(race_late_share, "never-stopping guest, GET every 10 ms: share of changed pages reported one collection later (per iteration)");
SERIES(race_changed_pages, "never-stopping guest: pages changed between two reads (per iteration)");
SERIES(race_get_ns, "never-stopping guest: KVM_GET_DIRTY_LOG with the vCPU running (ns per call)");
SERIES(race_check_ns, "never-stopping guest: reading every page's value after the GET (ns per read of the slot)");
SERIES(userspace_exit_ns, "KVM_RUN returning to the VMM on an I/O exit and entered again (ns per round trip)");
SERIES(pf_fixed_per_fault, "KVM stat pf_fixed per page of a logging pass (1 = native execution)");
SERIES(insn_emulation_per_fault, "KVM stat insn_emulation per page of a logging pass (0 = native execution)");

static void stats_around_pass(struct vm *vm, struct vcpu *c, uint64_t pages, uint64_t *ns) {
  int64_t pf0 = vcpu_stat(c, "pf_fixed"), em0 = vcpu_stat(c, "insn_emulation");
  *ns = run_pass(vm, c, NULL);
  int64_t pf1 = vcpu_stat(c, "pf_fixed"), em1 = vcpu_stat(c, "insn_emulation");
  if (pf0 >= 0 && pf1 >= 0) add(&pf_fixed_per_fault, (double)(pf1 - pf0) / pages);
  if (em0 >= 0 && em1 >= 0) add(&insn_emulation_per_fault, (double)(em1 - em0) / pages);
}

/* Bitmap logging: mapping, writes, enable, fault passes, GET (all, none, sparse), disable. */
static void measure_bitmap(size_t size, int reps) {
  struct vm *vm = create_vm(size, 1, 0, 0, 0);
  struct vcpu *c = &vm->cpu[0];
  uint64_t ns;
  add(&first_touch_ns_per_page, (double)run_pass(vm, c, NULL) / vm->pages);
  for (int r = 0; r < reps; r++) add(&write_ns_per_page, (double)run_pass(vm, c, NULL) / vm->pages);
  set_range(c, 0, 1, 1); /* one write, then out: the exit to userspace and back */
  for (int r = 0; r < reps; r++) {
    uint64_t t0 = now_ns();
    for (int i = 0; i < 100; i++) run_pass(vm, c, NULL);
    add(&userspace_exit_ns, (double)(now_ns() - t0) / 100);
  }
  set_range(c, 0, vm->pages, 1);
  for (int r = 0; r < reps; r++) {
    uint64_t t0 = now_ns();
    set_slot(vm, KVM_MEM_LOG_DIRTY_PAGES);
    add(&enable_logging_ns, now_ns() - t0);
    stats_around_pass(vm, c, vm->pages, &ns);
    add(&write_fault_ns_per_page, (double)ns / vm->pages);
    free(get_log(vm, &ns)); /* the bitmap of the enabling pass: its pages were dirtied after enable */
    for (int g = 0; g < 2; g++) {
      run_pass(vm, c, NULL);
      uint64_t *bm = get_log(vm, &ns);
      add(&get_all_dirty_ns, ns);
      check_bitmap(bm, 0, vm->pages, 1);
      free(bm);
      free(get_log(vm, &ns));
      add(&get_none_dirty_ns, ns);
    }
    set_range(c, 0, vm->pages, 64);
    run_pass(vm, c, NULL);
    uint64_t *bm = get_log(vm, &ns);
    add(&get_sparse_ns, ns);
    check_bitmap(bm, 0, vm->pages, 64);
    free(bm);
    set_range(c, 0, vm->pages, 512);
    run_pass(vm, c, NULL);
    bm = get_log(vm, &ns);
    add(&get_sparse8_ns, ns);
    check_bitmap(bm, 0, vm->pages, 512);
    free(bm);
    set_range(c, 0, vm->pages, 1);
    t0 = now_ns();
    set_slot(vm, 0);
    add(&disable_logging_ns, now_ns() - t0);
    run_pass(vm, c, NULL); /* remap writable after disable, as the next enable expects */
  }
  destroy_vm(vm);
}

/* Logging turned on over a slot of which one page in `stride` was ever touched. */
static void measure_sparse_enable(size_t size, int reps, uint64_t stride, struct series *s) {
  for (int r = 0; r < reps; r++) {
    struct vm *vm = create_vm(size, 1, 0, 0, 0);
    set_range(&vm->cpu[0], 0, vm->pages, stride);
    run_pass(vm, &vm->cpu[0], NULL);
    uint64_t t0 = now_ns();
    set_slot(vm, KVM_MEM_LOG_DIRTY_PAGES);
    add(s, now_ns() - t0);
    destroy_vm(vm);
  }
}

/* THP backing: enable and disable logging over huge-page-backed memory. */
static void measure_thp(size_t size, int reps) {
  struct vm *vm = create_vm(size, 1, 0, 0, 1);
  struct vcpu *c = &vm->cpu[0];
  run_pass(vm, c, NULL);
  for (int r = 0; r < reps; r++) {
    run_pass(vm, c, NULL);
    uint64_t t0 = now_ns();
    set_slot(vm, KVM_MEM_LOG_DIRTY_PAGES);
    add(&enable_logging_thp_ns, now_ns() - t0);
    run_pass(vm, c, NULL);
    t0 = now_ns();
    set_slot(vm, 0);
    add(&disable_logging_thp_ns, now_ns() - t0);
  }
  for (int r = 0; r < reps; r++) {
    run_pass(vm, c, NULL); /* blocks again */
    set_slot(vm, KVM_MEM_LOG_DIRTY_PAGES);
    set_range(c, 0, vm->pages, 8);
    run_pass(vm, c, NULL);
    uint64_t t0 = now_ns();
    set_slot(vm, 0);
    add(&disable_logging_thp_sparse_ns, now_ns() - t0);
    set_range(c, 0, vm->pages, 1);
  }
  destroy_vm(vm);
}

/* Manual protect: GET without protection, CLEAR of the whole slot, CLEAR in 64-page calls; INITIALLY_SET. */
static void measure_manual(size_t size, int reps) {
  struct vm *vm = create_vm(size, 1, 0, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, 0);
  struct vcpu *c = &vm->cpu[0];
  uint64_t ns;
  run_pass(vm, c, NULL);
  set_slot(vm, KVM_MEM_LOG_DIRTY_PAGES);
  for (int r = 0; r < reps; r++) {
    run_pass(vm, c, NULL);
    uint64_t *bm = get_log(vm, &ns);
    add(&manual_get_all_dirty_ns, ns);
    check_bitmap(bm, 0, vm->pages, 1);
    struct kvm_clear_dirty_log cl = {.slot = 1, .first_page = 0, .num_pages = vm->pages, .dirty_bitmap = bm};
    uint64_t t0 = now_ns();
    if (ioctl(vm->fd, KVM_CLEAR_DIRTY_LOG, &cl) < 0) die("KVM_CLEAR_DIRTY_LOG");
    add(&clear_slot_ns, now_ns() - t0);
    free(bm);
    run_pass(vm, c, NULL);
    bm = get_log(vm, &ns);
    check_bitmap(bm, 0, vm->pages, 1);
    for (uint64_t p = 0; p < vm->pages; p += 64) {
      struct kvm_clear_dirty_log one = {.slot = 1, .first_page = p, .num_pages = 64, .dirty_bitmap = bm + p / 64};
      t0 = now_ns();
      if (ioctl(vm->fd, KVM_CLEAR_DIRTY_LOG, &one) < 0) die("KVM_CLEAR_DIRTY_LOG 64 pages");
      if (p / 64 % 16 == 0) add(&clear_64_pages_ns, now_ns() - t0);
    }
    free(bm);
  }
  destroy_vm(vm);
  for (int r = 0; r < reps; r++) {
    vm = create_vm(size, 1, 0, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET, 0);
    run_pass(vm, &vm->cpu[0], NULL);
    uint64_t t0 = now_ns();
    set_slot(vm, KVM_MEM_LOG_DIRTY_PAGES);
    add(&enable_logging_initially_set_ns, now_ns() - t0);
    destroy_vm(vm);
  }
}

/* Dirty ring: per-entry harvest and reset; with a small ring, its full exits. */
static void measure_ring(size_t size, int reps, uint32_t max_entries, uint32_t small_entries) {
  uint32_t entries = max_entries;
  while (entries / 2 >= size / PAGE + 128) entries /= 2; /* the smallest power of two that holds a pass */
  uint32_t sizes[2] = {entries, small_entries};
  for (int k = 0; k < 2; k++) {
    if (!sizes[k]) continue;
    struct vm *vm = create_vm(size, 1, sizes[k], 0, 0);
    struct vcpu *c = &vm->cpu[0];
    struct ring_tally t = {.seen = calloc(vm->pages, 1)};
    run_pass(vm, c, NULL);
    set_slot(vm, KVM_MEM_LOG_DIRTY_PAGES);
    for (int r = 0; r < reps; r++) {
      memset(&t, 0, offsetof(struct ring_tally, seen));
      memset(t.seen, 0, vm->pages);
      uint64_t ns = run_pass(vm, c, &t);
      reap_ring(vm, c, &t);
      for (uint64_t p = 0; p < vm->pages; p++) lost_pages += !t.seen[p];
      if (k == 0) {
        if (t.full_exits == 0) add(&ring_pass_ns_per_page, (double)ns / vm->pages);
        add(&ring_harvest_ns_per_entry, (double)t.harvest_ns / t.entries);
        add(&ring_reset_ns_per_entry, (double)t.reset_ns / t.entries);
      } else {
        add(&small_ring_pass_ns_per_page, (double)ns / vm->pages);
        add(&small_ring_full_exits, t.full_exits);
      }
    }
    if (k == 0)
      for (int r = 0; r < reps; r++) {
        /* Every 65th page: no two entries share a 64-page mask, so each is its own re-protect call. */
        set_range(c, 0, vm->pages, 65);
        memset(&t, 0, offsetof(struct ring_tally, seen));
        run_pass(vm, c, &t);
        reap_ring(vm, c, &t);
        add(&ring_reset_scattered_ns_per_entry, (double)t.reset_ns / t.entries);
        set_range(c, 0, vm->pages, 1);
      }
    free(t.seen);
    destroy_vm(vm);
  }
}

/* Two vCPUs, each writing its half of the slot at once, logging on. */
static void measure_two_vcpus(size_t size, int reps, int online_cpus) {
  if (online_cpus < 2) return;
  struct vm *vm = create_vm(size, 2, 0, 0, 0);
  for (int i = 0; i < 2; i++) run_pass(vm, &vm->cpu[i], NULL);
  for (int r = 0; r < reps; r++) {
    set_slot(vm, KVM_MEM_LOG_DIRTY_PAGES);
    pthread_t th[2];
    struct pass_arg a[2];
    uint64_t t0 = now_ns();
    for (int i = 0; i < 2; i++) {
      a[i] = (struct pass_arg){vm, &vm->cpu[i], 0};
      pthread_create(&th[i], NULL, pass_thread, &a[i]);
    }
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    uint64_t wall = now_ns() - t0;
    for (int i = 0; i < 2; i++) add(&two_vcpu_fault_ns_per_page, (double)a[i].ns / (vm->cpu[i].end - vm->cpu[i].first));
    add(&two_vcpu_fault_aggregate_ns_per_page, (double)wall / vm->pages);
    uint64_t ns;
    uint64_t *bm = get_log(vm, &ns);
    check_bitmap(bm, 0, vm->pages, 1);
    free(bm);
    set_slot(vm, 0);
    for (int i = 0; i < 2; i++) run_pass(vm, &vm->cpu[i], NULL);
  }
  destroy_vm(vm);
}

/*
 * The never-stopping guest: a vCPU thread writes the iteration into every
 * page, round and round; every 10 ms the host bumps the iteration, collects
 * the log and reads every page. A page whose value changed since the last
 * read but whose bit is clear was written after its word was collected: it
 * must be in the next collection, or KVM lost it.
 */
static void measure_race(size_t size, int iterations) {
  struct vm *vm = create_vm(size, 1, 0, 0, 0);
  struct vcpu *c = &vm->cpu[0];
  uint64_t n = vm->pages, ns;
  run_pass(vm, c, NULL);
  volatile uint64_t *epoch = (volatile uint64_t *)(vm->low + EPOCH_GPA);
  *epoch = 1;
  c->entry = EPOCH_CODE_GPA;
  set_range(c, 0, n, 1);
  set_slot(vm, KVM_MEM_LOG_DIRTY_PAGES);
  free(get_log(vm, &ns));
  uint64_t *prev = malloc(n * 8), *cur = malloc(n * 8);
  uint8_t *pending = calloc(n, 1), *late = calloc(n, 1);
  for (uint64_t p = 0; p < n; p++) prev[p] = *(volatile uint64_t *)(vm->mem + p * PAGE);
  race_stop = 0;
  pthread_t th;
  struct pass_arg a = {vm, c, 0};
  pthread_create(&th, NULL, race_thread, &a);
  for (int k = 1; k <= iterations; k++) {
    struct timespec ten = {0, 10 * 1000 * 1000};
    nanosleep(&ten, NULL);
    __atomic_store_n(epoch, (uint64_t)k + 1, __ATOMIC_RELEASE);
    uint64_t *bm = get_log(vm, &ns);
    add(&race_get_ns, ns);
    uint64_t t0 = now_ns();
    for (uint64_t p = 0; p < n; p++) cur[p] = *(volatile uint64_t *)(vm->mem + p * PAGE);
    add(&race_check_ns, now_ns() - t0);
    uint64_t changed = 0, nlate = 0;
    memset(late, 0, n);
    for (uint64_t p = 0; p < n; p++) {
      int reported = bm[p / 64] >> (p % 64) & 1;
      if (pending[p] && !reported) lost_pages++;
      if (cur[p] == prev[p]) continue;
      changed++;
      if (!reported) {
        nlate++;
        late[p] = 1;
      }
    }
    memcpy(prev, cur, n * 8);
    memcpy(pending, late, n);
    free(bm);
    if (k > 1 && changed) { /* the first interval includes the thread's start */
      add(&race_late_share, (double)nlate / changed);
      add(&race_changed_pages, changed);
      race_changed_total += changed;
      race_late_total += nlate;
    }
  }
  race_stop = 1;
  pthread_join(th, NULL);
  free(prev);
  free(cur);
  free(pending);
  free(late);
  destroy_vm(vm);
}

static void usage(void) {
  fprintf(stderr, "usage: kvm-harness [--device PATH (default /dev/kvm)] [--slot-mib N (default 1024)] [--reps N (default 5)] [--small-ring N (default 4096)]\n");
  exit(2);
}

int main(int argc, char **argv) {
  size_t slot_mib = 1024;
  int reps = 5;
  uint32_t small_ring = 4096;
  const char *device = "/dev/kvm";
  for (int i = 1; i < argc; i++) {
    if (i + 1 >= argc) usage();
    long v = strtol(argv[i + 1], NULL, 10);
    if (!strcmp(argv[i], "--device")) device = argv[i + 1];
    else if (!strcmp(argv[i], "--slot-mib") && v >= 2 && v <= 1024 && v % 2 == 0) slot_mib = v;
    else if (!strcmp(argv[i], "--reps") && v >= 1 && v <= 100) reps = v;
    else if (!strcmp(argv[i], "--small-ring") && v >= 64 && (v & (v - 1)) == 0) small_ring = v;
    else usage();
    i++;
  }
  kvm_fd = open(device, O_RDWR | O_CLOEXEC);
  if (kvm_fd < 0) {
    fprintf(stderr, "kvm-harness: %s: %s\n", device, strerror(errno));
    return 3;
  }
  int api = ioctl(kvm_fd, KVM_GET_API_VERSION, 0);
  run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
  cpuid = calloc(1, sizeof *cpuid + 256 * sizeof(struct kvm_cpuid_entry2));
  cpuid->nent = 256;
  if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
  int ring_max = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING);
  int ring_bitmap = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP);
  int manual = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
  int online = (int)sysconf(_SC_NPROCESSORS_ONLN);
  size_t size = slot_mib * MIB;
  uint64_t t0 = now_ns();

  /* Progress on stderr, one line per phase ("phase N/6 name"), for the caller to show. */
  fprintf(stderr, "phase 1/6 bitmap: writes, faults, enable and disable, GET\n");
  measure_bitmap(size, reps);
  fprintf(stderr, "phase 2/6 THP backing and sparse mappings: enable and disable\n");
  measure_thp(size, reps);
  measure_sparse_enable(size, reps, 8, &enable_logging_sparse_ns);
  measure_sparse_enable(size, reps, 64, &enable_logging_sparse64_ns);
  fprintf(stderr, "phase 3/6 manual protect: GET, CLEAR, INITIALLY_SET\n");
  if (manual > 0) measure_manual(size, reps);
  fprintf(stderr, "phase 4/6 dirty ring: harvest, reset, ring-full exits\n");
  if (ring_max > 0) measure_ring(size, reps, ring_max / sizeof(struct kvm_dirty_gfn), small_ring);
  fprintf(stderr, "phase 5/6 two vCPUs faulting at once\n");
  measure_two_vcpus(size, reps, online);
  fprintf(stderr, "phase 6/6 a never-stopping guest, collected every 10 ms\n");
  measure_race(size, 10 * reps + 1);

  printf("{\n  \"harness\": \"kvm-harness\",\n  \"kvm_api_version\": %d,\n  \"caps\": {\"dirty_log_ring_bytes\": %d, \"dirty_log_ring_with_bitmap\": %d, \"manual_dirty_log_protect2\": %d},\n", api, ring_max, ring_bitmap, manual);
  printf("  \"race\": {\"changed_pages\": %lu, \"late_pages\": %lu},\n", (unsigned long)race_changed_total, (unsigned long)race_late_total);
  printf("  \"online_cpus\": %d,\n  \"slot_bytes\": %zu,\n  \"reps\": %d,\n  \"small_ring_entries\": %u,\n  \"lost_pages\": %lu,\n  \"wall_ns\": %lu,\n  \"measurements\": {", online, size, reps,
         small_ring, (unsigned long)lost_pages, (unsigned long)(now_ns() - t0));
  struct series *all[] = {&write_ns_per_page, &first_touch_ns_per_page, &write_fault_ns_per_page, &enable_logging_ns, &disable_logging_ns, &enable_logging_thp_ns,
                          &disable_logging_thp_ns, &enable_logging_initially_set_ns, &get_all_dirty_ns, &get_none_dirty_ns, &get_sparse_ns, &get_sparse8_ns, &enable_logging_sparse_ns, &enable_logging_sparse64_ns, &disable_logging_thp_sparse_ns, &ring_reset_scattered_ns_per_entry, &manual_get_all_dirty_ns,
                          &clear_slot_ns, &clear_64_pages_ns, &ring_harvest_ns_per_entry, &ring_reset_ns_per_entry, &ring_pass_ns_per_page, &small_ring_pass_ns_per_page,
                          &small_ring_full_exits, &two_vcpu_fault_ns_per_page, &two_vcpu_fault_aggregate_ns_per_page, &race_late_share, &race_changed_pages, &race_get_ns, &race_check_ns, &userspace_exit_ns, &pf_fixed_per_fault, &insn_emulation_per_fault};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++) emit(all[i]);
  printf("\n  }\n}\n");
  return lost_pages ? 4 : 0;
}
