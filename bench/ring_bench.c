/*
 * Ring benchmarks: kmod/src/notify.c itself, built against the kernel
 * API shim of kmod/test/harness (shim/kshim.h), each figure printed
 * beside the baseline it is judged against, measured in the same run.
 *
 *	ring_bench OPS
 *
 * prints one "NAME VALUE" line per figure (ns per op, or ops per
 * second for the threaded ones).  bench/ring.py builds and runs it and
 * takes medians over runs.
 *
 * The shim makes the spinlock a pthread mutex and copy_to_user a
 * process_vm_writev(2) of our own pid, so the drain carries a syscall
 * that the kernel's copy does not; the baselines use the same mutex.
 */
#include "kshim.h"
#include "super.h"
#include "ioctl.h"
#include "notify.h"

#include <fcntl.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#define REC_SIZE	sizeof(struct scoutfs_ioctl_notify_record)
#define RING_NR		1024	/* NOTIFY_RING_NR in notify.c */
#define MAX_THREADS	2

static struct scoutfs_ioctl_notify_record drained[RING_NR];

static u64 now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (u64)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void report(const char *name, double value)
{
	printf("%s %.4f\n", name, value);
	fflush(stdout);
}

/* --- a mount and a process, as notify_test.c makes them --- */

struct proc {
	struct pid pid;
	struct signal_struct signal;
	struct task_struct task;
};

static void thread_init(struct task_struct *task, struct proc *p)
{
	memset(task, 0, sizeof(*task));
	task->tgid = &p->pid;
	task->signal = &p->signal;
	task->cap_sys_admin = true;
	task->fsuid = 1000;
	task->fsgid = 1000;
}

static void proc_init(struct proc *p, int nr)
{
	memset(p, 0, sizeof(*p));
	atomic_store(&p->pid.count, 1);
	p->pid.nr = nr;
	atomic_store(&p->pid.task, &p->task);
	atomic_store(&p->signal.live, 1);
	thread_init(&p->task, p);
}

struct mount {
	struct super_block sb;
	struct scoutfs_sb_info sbi;
	struct inode inode;
	struct file file;
};

static void mount_init(struct mount *m)
{
	memset(m, 0, sizeof(*m));
	m->sb.s_fs_info = &m->sbi;
	m->inode.i_sb = &m->sb;
	m->inode.ino = 100;
	m->file.f_inode = &m->inode;
	m->file.f_flags = O_RDONLY;
	if (scoutfs_notify_setup(&m->sb) != 0) {
		fprintf(stderr, "ring_bench: scoutfs_notify_setup failed\n");
		exit(1);
	}
}

static long drain(struct mount *m, u32 flags, u32 timeout_ms)
{
	struct scoutfs_ioctl_read_notify rn = {
		.buf_ptr = (unsigned long)drained,
		.buf_bytes = sizeof(drained),
		.flags = flags,
		.timeout_ms = timeout_ms,
	};

	return scoutfs_ioctl(&m->file, SCOUTFS_IOC_READ_NOTIFY, (unsigned long)&rn);
}

/* --- baselines --- */

/* the cheapest thing a hook could be: a call that does nothing */
static void __attribute__((noinline)) empty_call(struct file *file, loff_t pos, ssize_t ret)
{
	__asm__ volatile("" : : "r"(file), "r"(pos), "r"(ret) : "memory");
}

/* the cheapest ring there is: a 64-byte copy under the same lock type */
struct plain_ring {
	spinlock_t lock;
	struct scoutfs_ioctl_notify_record ring[RING_NR];
	u64 head;
	u64 tail;
};

static struct plain_ring plain;

static void plain_emit(const struct scoutfs_ioctl_notify_record *rec)
{
	spin_lock(&plain.lock);
	if (plain.tail - plain.head < RING_NR) {
		memcpy(&plain.ring[plain.tail % RING_NR], rec, REC_SIZE);
		plain.tail++;
	}
	spin_unlock(&plain.lock);
}

static long plain_drain(void)
{
	long n;
	long i;

	spin_lock(&plain.lock);
	n = plain.tail - plain.head;
	for (i = 0; i < n; i++)
		memcpy(&drained[i], &plain.ring[(plain.head + i) % RING_NR], REC_SIZE);
	plain.head = plain.tail;
	spin_unlock(&plain.lock);
	return n;
}

#define CHUNKS	5

typedef void (*loop_fn)(struct mount *m, long n);

static void loop_empty_call(struct mount *m, long n)
{
	long i;

	for (i = 0; i < n; i++)
		empty_call(&m->file, i, 1);
}

static void loop_hook(struct mount *m, long n)
{
	long i;

	for (i = 0; i < n; i++)
		scoutfs_notify_read(&m->file, i, 1);
}

static void loop_clock(struct mount *m, long n)
{
	volatile u64 sink;
	long i;

	for (i = 0; i < n; i++)
		sink = ktime_get_real_ns();
	(void)sink;
}

static double fastest(long ops, loop_fn fn, struct mount *m)
{
	double best = 0;
	u64 start;
	double ns;
	int c;

	for (c = 0; c < CHUNKS; c++) {
		start = now_ns();
		fn(m, ops / CHUNKS);
		ns = (double)(now_ns() - start) / (ops / CHUNKS);
		if (c == 0 || ns < best)
			best = ns;
	}
	return best;
}

/* --- threaded: emitters while this thread drains --- */

static atomic_int emitters_done;

struct emitter {
	struct mount *m;	/* NULL: the plain ring */
	struct proc *proc;
	struct task_struct task;
	long ops;
	pthread_t thread;
};

static void *emitter_thread(void *arg)
{
	struct emitter *e = arg;
	struct scoutfs_ioctl_notify_record rec = { .seq = 1 };
	long i;

	if (e->m) {
		thread_init(&e->task, e->proc);
		current = &e->task;
		for (i = 0; i < e->ops; i++)
			scoutfs_notify_read(&e->m->file, i, 1);
	} else {
		for (i = 0; i < e->ops; i++) {
			rec.pos = i;
			plain_emit(&rec);
		}
	}
	atomic_fetch_add(&emitters_done, 1);
	return NULL;
}

/* emits per second with nr emitters while the calling thread drains */
static double threaded(struct mount *m, struct proc *p, int nr, long ops)
{
	struct emitter es[MAX_THREADS];
	u64 start;
	int i;

	atomic_store(&emitters_done, 0);
	start = now_ns();
	for (i = 0; i < nr; i++) {
		es[i].m = m;
		es[i].proc = p;
		es[i].ops = ops / nr;
		pthread_create(&es[i].thread, NULL, emitter_thread, &es[i]);
	}
	/* the daemon's loop: a bounded WAIT, then whatever is there */
	while (atomic_load(&emitters_done) < nr) {
		if (m)
			drain(m, SCOUTFS_IOC_READ_NOTIFY_WAIT, 10);
		else
			plain_drain();
	}
	for (i = 0; i < nr; i++)
		pthread_join(es[i].thread, NULL);
	return (double)(ops / nr) * nr * 1e9 / (now_ns() - start);
}

int main(int argc, char **argv)
{
	struct scoutfs_ioctl_notify_record rec = { .seq = 1 };
	struct mount m;
	struct proc p;
	long ops = argc > 1 ? atol(argv[1]) : 10000000;
	long done;
	long i;
	u64 start;
	u64 ns;
	int nr;

	mount_init(&m);
	proc_init(&p, 10);
	current = &p.task;
	spin_lock_init(&plain.lock);

	/*
	 * Nanosecond loops: the fastest of CHUNKS chunks, so that one
	 * preemption on a shared machine does not make the figure.
	 */
	report("empty_call_ns", fastest(ops, loop_empty_call, &m));
	report("hook_no_reader_ns", fastest(ops, loop_hook, &m));
	report("clock_read_ns", fastest(ops / 10, loop_clock, &m));

	/* plain copy: emit a ringful, empty it, untimed */
	ns = 0;
	for (done = 0; done < ops; done += RING_NR) {
		start = now_ns();
		for (i = 0; i < RING_NR; i++) {
			rec.pos = i;
			plain_emit(&rec);
		}
		ns += now_ns() - start;
		plain_drain();
	}
	report("plain_copy_locked_ns", (double)ns / done);

	/* attach, then time ringfuls of emits and, apart, their drains */
	drain(&m, 0, 0);
	ns = 0;
	for (done = 0; done < ops; done += RING_NR) {
		start = now_ns();
		for (i = 0; i < RING_NR; i++)
			scoutfs_notify_read(&m.file, i, 1);
		ns += now_ns() - start;
		drain(&m, 0, 0);
	}
	report("emit_stored_ns", (double)ns / done);

	ns = 0;
	for (done = 0; done < ops; done += RING_NR) {
		for (i = 0; i < RING_NR; i++)
			scoutfs_notify_read(&m.file, i, 1);
		start = now_ns();
		if (drain(&m, 0, 0) != RING_NR) {
			fprintf(stderr, "ring_bench: short drain\n");
			return 1;
		}
		ns += now_ns() - start;
	}
	report("drain_per_record_ns", (double)ns / done);

	for (nr = 1; nr <= MAX_THREADS; nr++) {
		char name[64];

		snprintf(name, sizeof(name), "plain_threads_%d_per_s", nr);
		report(name, threaded(NULL, &p, nr, ops));
		snprintf(name, sizeof(name), "emit_threads_%d_per_s", nr);
		report(name, threaded(&m, &p, nr, ops));
	}

	scoutfs_notify_destroy(&m.sb);
	return 0;
}
