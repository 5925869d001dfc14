/*
 * Tests and benchmarks of the notify ring and its ioctl, run against
 * kmod/src/notify.c itself with the kernel API shimmed (shim/kshim.h).
 *
 *	notify_test list		one test name a line
 *	notify_test run NAME|all	"ok NAME" or "FAIL NAME: why", exit 1 on failure
 *	notify_test bench [OPS]		"bench name=... ops=... ns_per_op=..." lines
 *
 * Tasks are simulated: each "process" is a tgid pid with a signal
 * struct, each thread of it a task_struct that points at them.
 */
#include "kshim.h"
#include "super.h"
#include "ioctl.h"
#include "notify.h"
#include "scoutfs_trace.h"

#include <fcntl.h>
#include <stdarg.h>
#include <sched.h>
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define REC_SIZE	sizeof(struct scoutfs_ioctl_notify_record)
#define RING_NR		1024
#define NR_INODES	8

static const char *failed_test;

#define CHECK(cond)							\
	do {								\
		if (!(cond)) {						\
			fail(__FILE__, __LINE__, "%s", #cond);		\
			return 1;					\
		}							\
	} while (0)

#define CHECK_EQ(a, b)							\
	do {								\
		unsigned long long __a = (a), __b = (b);		\
		if (__a != __b) {					\
			fail(__FILE__, __LINE__, "%s == %s: %llu != %llu", \
			     #a, #b, __a, __b);				\
			return 1;					\
		}							\
	} while (0)

static void __attribute__((format(printf, 3, 4)))
fail(const char *file, int line, const char *fmt, ...)
{
	va_list args;

	printf("FAIL %s: %s:%d: ", failed_test, file, line);
	va_start(args, fmt);
	vprintf(fmt, args);
	va_end(args);
	printf("\n");
	fflush(stdout);
}

/* a simulated process and its first thread */
struct proc {
	struct pid pid;
	struct signal_struct signal;
	struct task_struct task;
};

static void thread_init(struct task_struct *task, struct proc *p, bool admin);

static void proc_init(struct proc *p, int nr, bool admin)
{
	memset(p, 0, sizeof(*p));
	atomic_store(&p->pid.count, 1);
	p->pid.nr = nr;
	atomic_store(&p->pid.task, &p->task);
	atomic_store(&p->signal.live, 1);
	thread_init(&p->task, p, admin);
}

static void thread_init(struct task_struct *task, struct proc *p, bool admin)
{
	memset(task, 0, sizeof(*task));
	task->tgid = &p->pid;
	task->signal = &p->signal;
	task->cap_sys_admin = admin;
	task->fsuid = 1000 + p->pid.nr;
	task->fsgid = 2000 + p->pid.nr;
}

/* exited but not yet reaped: the pid still finds the zombie leader */
static void proc_exit(struct proc *p)
{
	atomic_store(&p->signal.live, 0);
}

static void proc_reap(struct proc *p)
{
	atomic_store(&p->signal.live, 0);
	atomic_store(&p->pid.task, NULL);
}

struct mount {
	struct super_block sb;
	struct scoutfs_sb_info sbi;
	struct inode inodes[NR_INODES];
	struct file files[NR_INODES];
};

static int mount_init(struct mount *m)
{
	int i;

	memset(m, 0, sizeof(*m));
	m->sb.s_fs_info = &m->sbi;
	for (i = 0; i < NR_INODES; i++) {
		m->inodes[i].i_sb = &m->sb;
		m->inodes[i].ino = 100 + i;
		m->files[i].f_inode = &m->inodes[i];
		m->files[i].f_flags = O_RDONLY | O_NOATIME;
	}
	return scoutfs_notify_setup(&m->sb);
}

static u64 counter(struct mount *m, int which)
{
	switch (which) {
	case 0: return atomic_load(&m->sbi.counters.notify_emitted);
	case 1: return atomic_load(&m->sbi.counters.notify_dropped_ring_full);
	default: return atomic_load(&m->sbi.counters.notify_reader_attached);
	}
}
#define EMITTED(m)	counter(m, 0)
#define DROPPED(m)	counter(m, 1)
#define ATTACHED(m)	counter(m, 2)

/* the ioctl as userspace sees it: -1 and errno on failure */
static long read_notify_arg(struct mount *m, void *arg)
{
	long ret = scoutfs_ioctl(&m->files[0], SCOUTFS_IOC_READ_NOTIFY,
				 (unsigned long)arg);

	if (ret < 0) {
		errno = -ret;
		return -1;
	}
	return ret;
}

static long read_notify(struct mount *m, struct scoutfs_ioctl_notify_record *recs,
			u32 nr, u32 flags, u32 timeout_ms, u64 *dropped)
{
	struct scoutfs_ioctl_read_notify rn = {
		.buf_ptr = (unsigned long)recs,
		.buf_bytes = nr * REC_SIZE,
		.flags = flags,
		.timeout_ms = timeout_ms,
		.dropped = ~0ULL,
	};
	long ret = read_notify_arg(m, &rn);

	if (dropped)
		*dropped = rn.dropped;
	return ret;
}

/* the hooks as the patched file.c calls them */
static void emit_open(struct mount *m, int i)
{
	scoutfs_notify_open(&m->files[i % NR_INODES]);
}

static void emit_read(struct mount *m, int i, loff_t pos, ssize_t ret)
{
	scoutfs_notify_read(&m->files[i % NR_INODES], pos, ret);
}

static struct scoutfs_ioctl_notify_record recs[4 * RING_NR];

static int test_order(void)
{
	struct mount m;
	struct proc a;
	u64 before;
	u64 after;
	u64 dropped;
	int i;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	current = &a.task;

	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, &dropped), 0);
	CHECK_EQ(dropped, 0);
	CHECK_EQ(ATTACHED(&m), 1);

	before = ktime_get_real_ns();
	for (i = 0; i < 10; i++) {
		if (i % 2)
			emit_read(&m, i, i * 4096, 100 + i);
		else
			emit_open(&m, i);
	}
	/* a read that returned nothing or failed isn't an access */
	emit_read(&m, 1, 0, 0);
	emit_read(&m, 1, 0, -EIO);
	after = ktime_get_real_ns();

	CHECK_EQ(read_notify(&m, recs, 64, 0, 0, &dropped), 10);
	CHECK_EQ(dropped, 0);
	for (i = 0; i < 10; i++) {
		struct scoutfs_ioctl_notify_record *rec = &recs[i];

		CHECK_EQ(le64toh(rec->seq), i + 1);
		CHECK_EQ(le64toh(rec->ino), 100 + i % NR_INODES);
		CHECK(le64toh(rec->time_ns) >= before);
		CHECK(le64toh(rec->time_ns) <= after);
		CHECK_EQ(le32toh(rec->pid), 10);
		CHECK_EQ(le32toh(rec->uid), 1010);
		CHECK_EQ(le32toh(rec->gid), 2010);
		CHECK_EQ(le16toh(rec->version), SCOUTFS_IOC_NOTIFY_VERSION);
		CHECK_EQ(rec->_pad[0] | rec->_pad[1] | rec->_pad[2] | rec->_pad[3], 0);
		if (i % 2) {
			CHECK_EQ(le16toh(rec->type), SCOUTFS_IOC_NOTIFY_READ);
			CHECK_EQ(le64toh(rec->pos), i * 4096);
			CHECK_EQ(le64toh(rec->count), 100 + i);
			CHECK_EQ(le32toh(rec->flags), 0);
		} else {
			CHECK_EQ(le16toh(rec->type), SCOUTFS_IOC_NOTIFY_OPEN);
			CHECK_EQ(le64toh(rec->pos), 0);
			CHECK_EQ(le64toh(rec->count), 0);
			CHECK_EQ(le32toh(rec->flags), O_RDONLY | O_NOATIME);
		}
	}
	CHECK_EQ(read_notify(&m, recs, 64, 0, 0, NULL), 0);
	CHECK_EQ(EMITTED(&m), 10);
	CHECK_EQ(DROPPED(&m), 0);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

static int test_no_reader(void)
{
	struct mount m;
	struct proc a;
	int i;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	current = &a.task;

	CHECK(!m.sbi.notify_emitting);
	for (i = 0; i < 5; i++)
		emit_open(&m, i);
	CHECK_EQ(EMITTED(&m), 0);

	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, NULL), 0);
	CHECK(m.sbi.notify_emitting);
	emit_open(&m, 3);
	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, NULL), 1);
	CHECK_EQ(le64toh(recs[0].seq), 1);
	CHECK_EQ(le64toh(recs[0].ino), 103);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

static int test_full(void)
{
	struct mount m;
	struct proc a;
	long drops;
	u64 dropped;
	u64 seq;
	int i;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	current = &a.task;
	CHECK_EQ(read_notify(&m, recs, 1, 0, 0, NULL), 0);

	drops = atomic_load(&kshim_trace.drop);
	for (i = 0; i < RING_NR + 500; i++)
		emit_read(&m, i, i, 1);
	CHECK_EQ(EMITTED(&m), RING_NR + 500);
	CHECK_EQ(DROPPED(&m), 500);
	/* each drop is traced with its seq and the reader's dropped count */
	CHECK_EQ(atomic_load(&kshim_trace.drop) - drops, 500);
	CHECK_EQ(kshim_trace.seq, RING_NR + 500);
	CHECK_EQ(kshim_trace.dropped, 500);

	CHECK_EQ(read_notify(&m, recs, 2 * RING_NR, 0, 0, &dropped), RING_NR);
	CHECK_EQ(dropped, 500);
	for (i = 0; i < RING_NR; i++)
		CHECK_EQ(le64toh(recs[i].seq), i + 1);

	/* the next stored record shows the gap the drops left */
	emit_read(&m, 0, 0, 1);
	CHECK_EQ(read_notify(&m, recs, 2 * RING_NR, 0, 0, &dropped), 1);
	seq = le64toh(recs[0].seq);
	CHECK_EQ(seq - RING_NR - 1, 500);
	CHECK_EQ(dropped, 500);

	/* fill again behind a partial drain, drops add up */
	for (i = 0; i < RING_NR; i++)
		emit_read(&m, i, i, 1);
	CHECK_EQ(read_notify(&m, recs, 100, 0, 0, &dropped), 100);
	for (i = 0; i < 300; i++)
		emit_read(&m, i, i, 1);
	CHECK_EQ(DROPPED(&m), 500 + 200);
	CHECK_EQ(read_notify(&m, recs, 4 * RING_NR, 0, 0, &dropped), RING_NR);
	CHECK_EQ(dropped, 700);
	CHECK_EQ(le64toh(recs[0].seq), seq + 101);
	CHECK_EQ(le64toh(recs[RING_NR - 101].seq), seq + RING_NR);
	CHECK_EQ(le64toh(recs[RING_NR - 100].seq), seq + RING_NR + 1);
	CHECK_EQ(le64toh(recs[RING_NR - 1].seq), seq + RING_NR + 100);
	CHECK_EQ(EMITTED(&m), RING_NR + 500 + 1 + RING_NR + 300);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

static int test_partial(void)
{
	struct mount m;
	struct proc a;
	u64 expect = 1;
	long ret;
	int round;
	int i;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	current = &a.task;
	CHECK_EQ(read_notify(&m, recs, 1, 0, 0, NULL), 0);

	/* 5 * 700 records wrap the ring's indices more than once */
	for (round = 0; round < 5; round++) {
		for (i = 0; i < 700; i++)
			emit_read(&m, i, expect + i, 1);
		for (i = 0; i < 100; i++) {
			ret = read_notify(&m, recs, 7, 0, 0, NULL);
			CHECK(ret >= 0);
			if (ret == 0)
				break;
			CHECK_EQ(ret, 7);
			while (ret-- > 0) {
				CHECK_EQ(le64toh(recs[6 - ret].seq), expect);
				CHECK_EQ(le64toh(recs[6 - ret].pos), expect);
				expect++;
			}
		}
		CHECK_EQ(i, 100);
	}
	CHECK_EQ(expect, 3501);
	CHECK_EQ(DROPPED(&m), 0);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

struct waiter {
	struct mount *m;
	struct task_struct task;
	u32 timeout_ms;
	long ret;
	int err;
	pthread_t thread;
};

static void *waiter_thread(void *arg)
{
	struct waiter *w = arg;

	current = &w->task;
	w->ret = read_notify(w->m, w->task.tgid == NULL ? NULL : recs + RING_NR,
			     16, SCOUTFS_IOC_READ_NOTIFY_WAIT, w->timeout_ms, NULL);
	w->err = w->ret < 0 ? errno : 0;
	return NULL;
}

static void start_waiter(struct waiter *w, struct mount *m, struct proc *p,
			 u32 timeout_ms)
{
	w->m = m;
	w->timeout_ms = timeout_ms;
	thread_init(&w->task, p, true);
	pthread_create(&w->thread, NULL, waiter_thread, w);
}

/* not a timing: blocks until the waiter is asleep in the ioctl */
static void until_waiting(int nr)
{
	while (atomic_load(&kshim_waiting) < nr)
		sched_yield();
}

static int test_wait_wakes(void)
{
	struct mount m;
	struct proc a;
	struct waiter w;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	current = &a.task;
	CHECK_EQ(read_notify(&m, recs, 1, 0, 0, NULL), 0);

	/* without a timeout only the emit's wake up ends the wait */
	start_waiter(&w, &m, &a, 0);
	until_waiting(1);
	emit_open(&m, 5);
	pthread_join(w.thread, NULL);
	CHECK_EQ(w.ret, 1);
	CHECK_EQ(le64toh(recs[RING_NR].ino), 105);

	/* and with one */
	start_waiter(&w, &m, &a, 24 * 3600 * 1000);
	until_waiting(1);
	emit_read(&m, 6, 0, 1);
	pthread_join(w.thread, NULL);
	CHECK_EQ(w.ret, 1);
	CHECK_EQ(le64toh(recs[RING_NR].ino), 106);

	/* a record already there returns at once */
	emit_open(&m, 2);
	CHECK_EQ(read_notify(&m, recs, 16, SCOUTFS_IOC_READ_NOTIFY_WAIT, 0, NULL), 1);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

static int test_wait_timeout(void)
{
	struct mount m;
	struct proc a;
	u64 dropped;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	current = &a.task;

	CHECK_EQ(read_notify(&m, recs, 16, SCOUTFS_IOC_READ_NOTIFY_WAIT, 20, &dropped), 0);
	CHECK_EQ(dropped, 0);
	CHECK_EQ(ATTACHED(&m), 1);
	CHECK_EQ(read_notify(&m, recs, 16, SCOUTFS_IOC_READ_NOTIFY_WAIT, 1, NULL), 0);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

static int test_wait_signal(void)
{
	struct mount m;
	struct proc a;
	struct waiter w;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	current = &a.task;
	CHECK_EQ(read_notify(&m, recs, 1, 0, 0, NULL), 0);

	start_waiter(&w, &m, &a, 0);
	until_waiting(1);
	kshim_signal(&w.task);
	pthread_join(w.thread, NULL);
	CHECK_EQ(w.ret, -1);
	CHECK_EQ(w.err, EINTR);

	/* the interrupted reader is still the reader and loses nothing */
	emit_open(&m, 1);
	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, NULL), 1);
	CHECK_EQ(le64toh(recs[0].seq), 1);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

static int test_detach(void)
{
	struct mount m;
	struct proc a;
	struct proc b;
	struct waiter w;
	long detaches;
	long attaches;
	u64 dropped;
	int i;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	proc_init(&b, 11, true);
	current = &a.task;

	/* detaching without a reader is fine */
	CHECK_EQ(read_notify(&m, recs, 1, SCOUTFS_IOC_READ_NOTIFY_DETACH, 0, NULL), 0);
	CHECK_EQ(ATTACHED(&m), 0);

	CHECK_EQ(read_notify(&m, recs, 1, 0, 0, NULL), 0);
	for (i = 0; i < RING_NR + 10; i++)
		emit_open(&m, i);

	/* only the reader can detach */
	current = &b.task;
	CHECK_EQ(read_notify(&m, recs, 1, SCOUTFS_IOC_READ_NOTIFY_DETACH, 0, NULL), -1);
	CHECK_EQ(errno, EBUSY);

	current = &a.task;
	detaches = atomic_load(&kshim_trace.detach);
	CHECK_EQ(read_notify(&m, recs, 16, SCOUTFS_IOC_READ_NOTIFY_DETACH, 0, NULL), 0);
	CHECK(!m.sbi.notify_emitting);
	/* traced with the records the detach discarded */
	CHECK_EQ(atomic_load(&kshim_trace.detach) - detaches, 1);
	CHECK_EQ(kshim_trace.pid, 10);
	CHECK_EQ(kshim_trace.discarded, RING_NR);
	CHECK_EQ(atomic_load(&a.pid.count), 1);

	/* nothing is emitted without a reader */
	for (i = 0; i < 5; i++)
		emit_open(&m, i);
	CHECK_EQ(EMITTED(&m), RING_NR + 10);

	/* the next reader finds the ring empty and its own dropped count */
	current = &b.task;
	attaches = atomic_load(&kshim_trace.attach);
	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, &dropped), 0);
	CHECK_EQ(dropped, 0);
	CHECK_EQ(atomic_load(&kshim_trace.attach) - attaches, 1);
	CHECK_EQ(kshim_trace.pid, 11);
	CHECK_EQ(kshim_trace.prev_pid, 0);
	CHECK_EQ(kshim_trace.stored, 0);
	emit_open(&m, 0);
	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, &dropped), 1);
	CHECK_EQ(le64toh(recs[0].seq), RING_NR + 11);

	/* a detach wakes the reader's other threads that wait */
	start_waiter(&w, &m, &b, 0);
	until_waiting(1);
	CHECK_EQ(read_notify(&m, recs, 1, SCOUTFS_IOC_READ_NOTIFY_DETACH, 0, NULL), 0);
	pthread_join(w.thread, NULL);
	CHECK_EQ(w.ret, 0);
	CHECK_EQ(ATTACHED(&m), 2);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

static int test_busy_takeover(void)
{
	struct task_struct a2;
	struct mount m;
	struct proc a;
	struct proc b;
	struct proc c;
	u64 dropped;
	int i;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	proc_init(&b, 11, true);
	proc_init(&c, 12, true);

	current = &a.task;
	CHECK_EQ(read_notify(&m, recs, 1, 0, 0, NULL), 0);
	CHECK_EQ(atomic_load(&a.pid.count), 2);
	for (i = 0; i < RING_NR + 3; i++)
		emit_open(&m, i);

	/* another thread of the reader's process drains */
	thread_init(&a2, &a, true);
	current = &a2;
	CHECK_EQ(read_notify(&m, recs, 1, 0, 0, &dropped), 1);
	CHECK_EQ(dropped, 3);

	current = &b.task;
	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, NULL), -1);
	CHECK_EQ(errno, EBUSY);
	CHECK_EQ(read_notify(&m, recs, 16, SCOUTFS_IOC_READ_NOTIFY_WAIT, 0, NULL), -1);
	CHECK_EQ(errno, EBUSY);

	/* an exited reader is replaced even before it's reaped */
	proc_exit(&a);
	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, &dropped), 16);
	CHECK_EQ(dropped, 0);
	/* the takeover is traced with the records the new reader inherits */
	CHECK_EQ(kshim_trace.pid, 11);
	CHECK_EQ(kshim_trace.prev_pid, 10);
	CHECK_EQ(kshim_trace.stored, RING_NR - 1);
	CHECK_EQ(le64toh(recs[0].seq), 2);
	CHECK_EQ(ATTACHED(&m), 2);
	CHECK_EQ(atomic_load(&a.pid.count), 1);
	CHECK_EQ(atomic_load(&b.pid.count), 2);

	/* the old reader's other thread can't drain any more */
	current = &a2;
	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, NULL), -1);
	CHECK_EQ(errno, EBUSY);

	proc_reap(&b);
	current = &c.task;
	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, NULL), 16);
	CHECK_EQ(le64toh(recs[0].seq), 18);
	CHECK_EQ(ATTACHED(&m), 3);
	CHECK_EQ(atomic_load(&b.pid.count), 1);

	scoutfs_notify_destroy(&m.sb);
	CHECK_EQ(atomic_load(&c.pid.count), 1);
	return 0;
}

static long read_notify_raw(struct mount *m, u64 buf_ptr, u32 buf_bytes,
			    u32 flags, u32 pad)
{
	struct scoutfs_ioctl_read_notify rn = {
		.buf_ptr = buf_ptr,
		.buf_bytes = buf_bytes,
		.flags = flags,
	};

	memcpy(rn._pad, &pad, sizeof(rn._pad));
	return read_notify_arg(m, &rn);
}

static int test_einval(void)
{
	static const u32 bad_bytes[] = { 0, 1, 63, 65, 127, 3 * 64 + 1, 0xffffffff };
	static const u32 bad_flags[] = {
		1 << 2, 1 << 31, SCOUTFS_IOC_READ_NOTIFY_WAIT | (1 << 5),
		SCOUTFS_IOC_READ_NOTIFY_DETACH | (1 << 3), SCOUTFS_IOC_READ_NOTIFY_UNKNOWN,
	};
	u64 buf = (unsigned long)recs;
	struct mount m;
	struct proc a;
	unsigned int i;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	current = &a.task;

	for (i = 0; i < sizeof(bad_bytes) / sizeof(bad_bytes[0]); i++) {
		CHECK_EQ(read_notify_raw(&m, buf, bad_bytes[i], 0, 0), -1);
		CHECK_EQ(errno, EINVAL);
		CHECK_EQ(read_notify_raw(&m, buf, bad_bytes[i],
					 SCOUTFS_IOC_READ_NOTIFY_DETACH, 0), -1);
		CHECK_EQ(errno, EINVAL);
	}
	for (i = 0; i < sizeof(bad_flags) / sizeof(bad_flags[0]); i++) {
		CHECK_EQ(read_notify_raw(&m, buf, 64, bad_flags[i], 0), -1);
		CHECK_EQ(errno, EINVAL);
	}
	CHECK_EQ(read_notify_raw(&m, buf, 64, 0, 1), -1);
	CHECK_EQ(errno, EINVAL);
	CHECK_EQ(read_notify_raw(&m, buf, 64, SCOUTFS_IOC_READ_NOTIFY_WAIT, 0x80000000), -1);
	CHECK_EQ(errno, EINVAL);

	/* nothing was taken on the way */
	CHECK_EQ(ATTACHED(&m), 0);
	CHECK(!m.sbi.notify_emitting);
	CHECK_EQ(atomic_load(&a.pid.count), 1);

	/* the good ones */
	CHECK_EQ(read_notify_raw(&m, buf, 64, 0, 0), 0);
	CHECK_EQ(read_notify_raw(&m, buf, 64 * 4 * RING_NR, 0, 0), 0);
	CHECK_EQ(read_notify(&m, recs, 1, SCOUTFS_IOC_READ_NOTIFY_WAIT, 1, NULL), 0);
	CHECK_EQ(read_notify_raw(&m, buf, 64, SCOUTFS_IOC_READ_NOTIFY_DETACH, 0), 0);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

static int test_eperm(void)
{
	struct mount m;
	struct proc a;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, false);
	current = &a.task;

	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, NULL), -1);
	CHECK_EQ(errno, EPERM);
	CHECK_EQ(read_notify(&m, recs, 16, SCOUTFS_IOC_READ_NOTIFY_DETACH, 0, NULL), -1);
	CHECK_EQ(errno, EPERM);
	CHECK_EQ(ATTACHED(&m), 0);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

static int test_efault(void)
{
	struct scoutfs_ioctl_read_notify *rn;
	long page = sysconf(_SC_PAGESIZE);
	struct mount m;
	struct proc a;
	char *none;
	char *ro;
	u64 dropped;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	current = &a.task;

	none = mmap(NULL, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	/*
	 * A page whose next page is surely inaccessible: a copy that runs off
	 * its end must fault, whatever else the allocator mapped beside it.
	 */
	ro = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE,
		  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(none != MAP_FAILED && ro != MAP_FAILED);
	CHECK_EQ(mprotect(ro + page, page, PROT_NONE), 0);

	/* an unreadable argument fails before anything is taken */
	CHECK_EQ(read_notify_arg(&m, none), -1);
	CHECK_EQ(errno, EFAULT);
	CHECK_EQ(ATTACHED(&m), 0);

	CHECK_EQ(read_notify(&m, recs, 1, 0, 0, NULL), 0);
	emit_open(&m, 1);
	emit_open(&m, 2);

	/* records that couldn't be copied stay in the ring */
	CHECK_EQ(read_notify(&m, (void *)none, 16, 0, 0, NULL), -1);
	CHECK_EQ(errno, EFAULT);
	CHECK_EQ(read_notify(&m, (void *)(ro + page - REC_SIZE), 16, 0, 0, NULL), -1);
	CHECK_EQ(errno, EFAULT);

	/* as do they when the dropped count can't be written back */
	rn = (void *)ro;
	rn->buf_ptr = (unsigned long)recs;
	rn->buf_bytes = 16 * REC_SIZE;
	rn->flags = 0;
	rn->timeout_ms = 0;
	memset(rn->_pad, 0, sizeof(rn->_pad));
	CHECK_EQ(mprotect(ro, page, PROT_READ), 0);
	CHECK_EQ(read_notify_arg(&m, rn), -1);
	CHECK_EQ(errno, EFAULT);

	CHECK_EQ(read_notify(&m, recs, 16, 0, 0, &dropped), 2);
	CHECK_EQ(le64toh(recs[0].seq), 1);
	CHECK_EQ(le64toh(recs[1].seq), 2);
	scoutfs_notify_destroy(&m.sb);
	munmap(none, page);
	munmap(ro, 2 * page);
	return 0;
}

static int test_destroy(void)
{
	long base = kshim_allocations();
	struct mount m;
	struct proc a;

	/* a failed mount never set up the info */
	memset(&m, 0, sizeof(m));
	m.sb.s_fs_info = &m.sbi;
	scoutfs_notify_destroy(&m.sb);

	CHECK_EQ(mount_init(&m), 0);
	CHECK(kshim_allocations() > base);
	proc_init(&a, 10, true);
	current = &a.task;
	CHECK_EQ(read_notify(&m, recs, 1, 0, 0, NULL), 0);
	emit_open(&m, 1);
	CHECK_EQ(atomic_load(&a.pid.count), 2);

	/* unmount with an attached reader and records in the ring */
	scoutfs_notify_destroy(&m.sb);
	CHECK_EQ(kshim_allocations(), base);
	CHECK_EQ(atomic_load(&a.pid.count), 1);
	CHECK(m.sbi.notify_info == NULL);
	CHECK(!m.sbi.notify_emitting);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

/*
 * Several emitters race one drainer.  Each emitter numbers its records
 * in pos.  Every seq must be drained at most once, in order, and the
 * ones never drained must be exactly the dropped ones.
 */
#define STRESS_EMITTERS		4
#define STRESS_RECORDS		1000000
#define STRESS_PER_EMITTER	(STRESS_RECORDS / STRESS_EMITTERS)

struct emitter {
	struct mount *m;
	struct task_struct task;
	int nr;
	pthread_t thread;
};

static atomic_int emitters_done;

static void *emitter_thread(void *arg)
{
	struct emitter *e = arg;
	int i;

	current = &e->task;
	/* yielding now and then lets the drainer keep some records */
	for (i = 0; i < STRESS_PER_EMITTER; i++) {
		emit_read(e->m, e->nr, i, 1);
		if ((i & 255) == 255)
			sched_yield();
	}
	atomic_fetch_add(&emitters_done, 1);
	return NULL;
}

static int test_stress(void)
{
	static struct scoutfs_ioctl_notify_record buf[RING_NR];
	struct emitter emitters[STRESS_EMITTERS];
	u64 last_pos[STRESS_EMITTERS];
	unsigned char *seen;
	struct mount m;
	struct proc a;
	u64 drained = 0;
	u64 last_seq = 0;
	u64 dropped = 0;
	u64 missing = 0;
	bool done;
	long ret;
	long i;
	int e;

	CHECK_EQ(mount_init(&m), 0);
	proc_init(&a, 10, true);
	current = &a.task;
	seen = calloc(STRESS_RECORDS + 1, 1);
	CHECK(seen != NULL);
	CHECK_EQ(read_notify(&m, buf, 1, 0, 0, NULL), 0);

	for (e = 0; e < STRESS_EMITTERS; e++) {
		emitters[e].m = &m;
		emitters[e].nr = e;
		last_pos[e] = ~0ULL;
		thread_init(&emitters[e].task, &a, false);
		pthread_create(&emitters[e].thread, NULL, emitter_thread, &emitters[e]);
	}

	for (;;) {
		done = atomic_load(&emitters_done) == STRESS_EMITTERS;
		ret = read_notify(&m, buf, RING_NR, done ? 0 : SCOUTFS_IOC_READ_NOTIFY_WAIT,
				  100, &dropped);
		CHECK(ret >= 0);
		if (ret == 0 && done)
			break;
		for (i = 0; i < ret; i++) {
			u64 seq = le64toh(buf[i].seq);
			u64 pos = le64toh(buf[i].pos);

			e = le64toh(buf[i].ino) - 100;
			CHECK(seq > last_seq);
			CHECK(seq <= STRESS_RECORDS);
			CHECK(e >= 0 && e < STRESS_EMITTERS);
			CHECK(last_pos[e] == ~0ULL || pos > last_pos[e]);
			CHECK_EQ(seen[seq], 0);
			seen[seq] = 1;
			last_seq = seq;
			last_pos[e] = pos;
			drained++;
		}
	}
	for (e = 0; e < STRESS_EMITTERS; e++)
		pthread_join(emitters[e].thread, NULL);

	for (i = 1; i <= STRESS_RECORDS; i++)
		missing += !seen[i];

	CHECK_EQ(EMITTED(&m), STRESS_RECORDS);
	CHECK_EQ(DROPPED(&m), dropped);
	CHECK_EQ(missing, dropped);
	CHECK_EQ(drained + dropped, STRESS_RECORDS);
	printf("# stress: %llu drained, %llu dropped\n",
	       (unsigned long long)drained, (unsigned long long)dropped);
	free(seen);
	scoutfs_notify_destroy(&m.sb);
	return 0;
}

struct test {
	const char *name;
	int (*func)(void);
};

static const struct test tests[] = {
	{ "order", test_order },
	{ "no_reader", test_no_reader },
	{ "full", test_full },
	{ "partial", test_partial },
	{ "wait_wakes", test_wait_wakes },
	{ "wait_timeout", test_wait_timeout },
	{ "wait_signal", test_wait_signal },
	{ "detach", test_detach },
	{ "busy_takeover", test_busy_takeover },
	{ "einval", test_einval },
	{ "eperm", test_eperm },
	{ "efault", test_efault },
	{ "destroy", test_destroy },
	{ "stress", test_stress },
};
#define NR_TESTS (sizeof(tests) / sizeof(tests[0]))

static int run(const struct test *t)
{
	int ret;

	failed_test = t->name;
	ret = t->func();
	if (ret == 0)
		printf("ok %s\n", t->name);
	fflush(stdout);
	return ret;
}

/*
 * Benchmarks: the nanoseconds one hook call costs in each state.  The
 * clock is read around the whole loop, never per call.
 */
static u64 now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (u64)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void report(const char *name, long ops, u64 ns)
{
	printf("bench name=%s ops=%ld ns_per_op=%.2f\n", name, ops,
	       (double)ns / ops);
	fflush(stdout);
}

struct bench_emitter {
	struct mount *m;
	struct task_struct task;
	long ops;
	u64 ns;
	pthread_t thread;
};

static void *bench_emitter_thread(void *arg)
{
	struct bench_emitter *b = arg;
	long i;

	current = &b->task;
	for (i = 0; i < b->ops; i++)
		emit_read(b->m, 0, i, 1);
	atomic_fetch_add(&emitters_done, 1);
	return NULL;
}

/* about a microsecond of busy work on a current CPU */
#define WORK_SPINS	1000

/* the calling thread's CPU time: a busy host's preemptions don't count */
static u64 thread_cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (u64)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* emits paced by busy work, in the emitting thread's CPU time */
static void *bench_paced_emitter_thread(void *arg)
{
	struct bench_emitter *b = arg;
	volatile unsigned long sink = 0;
	u64 start;
	long i;
	int w;

	current = &b->task;
	start = thread_cpu_ns();
	for (i = 0; i < b->ops; i++) {
		for (w = 0; w < WORK_SPINS; w++)
			sink += w;
		emit_read(b->m, 0, i, 1);
	}
	b->ns = thread_cpu_ns() - start;
	atomic_fetch_add(&emitters_done, 1);
	return NULL;
}

static int bench(long ops)
{
	struct bench_emitter bes[STRESS_EMITTERS];
	struct mount m;
	struct proc a;
	u64 start;
	u64 ns = 0;
	long done;
	long i;
	int nr;
	int e;

	if (mount_init(&m) != 0)
		return 1;
	proc_init(&a, 10, true);
	current = &a.task;

	start = now_ns();
	for (i = 0; i < ops; i++)
		emit_read(&m, 0, i, 1);
	report("hook_no_reader", ops, now_ns() - start);

	read_notify(&m, recs, 1, 0, 0, NULL);

	/* stored: drain between batches, time only the emits */
	for (done = 0; done < ops; done += RING_NR) {
		start = now_ns();
		for (i = 0; i < RING_NR; i++)
			emit_read(&m, 0, i, 1);
		ns += now_ns() - start;
		while (read_notify(&m, recs, 4 * RING_NR, 0, 0, NULL) > 0)
			;
	}
	report("emit_stored", done, ns);

	for (i = 0; i < RING_NR; i++)
		emit_read(&m, 0, i, 1);
	start = now_ns();
	for (i = 0; i < ops; i++)
		emit_read(&m, 0, i, 1);
	report("emit_dropped_full", ops, now_ns() - start);

	start = now_ns();
	for (i = 0; i < ops; i += RING_NR)
		read_notify(&m, recs, RING_NR, 0, 0, NULL);
	report("drain_empty_ioctl", (ops + RING_NR - 1) / RING_NR, now_ns() - start);

	/*
	 * A paced workload, WORK_SPINS of busy work per emit as a read
	 * syscall's own work would be, timed by its own thread: with no
	 * reader, with a reader that never drains (every emit a drop), and
	 * while this thread drains as scoutfs-notifyd does (WAIT only on an
	 * empty ring, a 1 ms pause after a drain of under half a ring).
	 * Their ratios are what a reader adds to each access in the kernel,
	 * the drainer's lock and cache line sharing and wakeups included.
	 */
	for (e = 0; e < 3; e++) {
		static const char *const names[] = {
			"paced_no_reader", "paced_idle_reader", "paced_delayed_drainer"
		};
		const struct timespec pause = { 0, 1000000 };
		struct bench_emitter be = { .m = &m, .ops = ops / 10 };
		int n;

		read_notify(&m, recs, 4 * RING_NR, SCOUTFS_IOC_READ_NOTIFY_DETACH, 0, NULL);
		if (e > 0)
			read_notify(&m, recs, 1, 0, 0, NULL);
		atomic_store(&emitters_done, 0);
		thread_init(&be.task, &a, false);
		pthread_create(&be.thread, NULL, bench_paced_emitter_thread, &be);
		while (atomic_load(&emitters_done) < 1) {
			if (e < 2) {
				nanosleep(&pause, NULL);
				continue;
			}
			n = read_notify(&m, recs, 4 * RING_NR, 0, 0, NULL);
			if (n == 0)
				n = read_notify(&m, recs, 4 * RING_NR,
						SCOUTFS_IOC_READ_NOTIFY_WAIT, 10, NULL);
			if (n > 0 && n < RING_NR / 2)
				nanosleep(&pause, NULL);
		}
		pthread_join(be.thread, NULL);
		report(names[e], be.ops, be.ns);
	}
	while (read_notify(&m, recs, 4 * RING_NR, 0, 0, NULL) > 0)
		;

	/* threads emitting while this one drains, wall time per record */
	for (nr = 1; nr <= STRESS_EMITTERS; nr *= 2) {
		char name[64];

		atomic_store(&emitters_done, 0);
		start = now_ns();
		for (e = 0; e < nr; e++) {
			bes[e].m = &m;
			bes[e].ops = ops / nr;
			thread_init(&bes[e].task, &a, false);
			pthread_create(&bes[e].thread, NULL, bench_emitter_thread,
				       &bes[e]);
		}
		while (atomic_load(&emitters_done) < nr)
			read_notify(&m, recs, 4 * RING_NR, SCOUTFS_IOC_READ_NOTIFY_WAIT,
				    10, NULL);
		for (e = 0; e < nr; e++)
			pthread_join(bes[e].thread, NULL);
		while (read_notify(&m, recs, 4 * RING_NR, 0, 0, NULL) > 0)
			;
		snprintf(name, sizeof(name), "emit_threads_%d_draining", nr);
		report(name, (ops / nr) * nr, now_ns() - start);
	}

	scoutfs_notify_destroy(&m.sb);
	return 0;
}

static int usage(void)
{
	fprintf(stderr, "usage: notify_test list | run NAME|all | bench [OPS]\n");
	return 2;
}

int main(int argc, char **argv)
{
	unsigned int i;
	int ret = 0;
	bool found = false;

	if (argc == 2 && !strcmp(argv[1], "list")) {
		for (i = 0; i < NR_TESTS; i++)
			printf("%s\n", tests[i].name);
		return 0;
	}

	if (argc >= 2 && !strcmp(argv[1], "bench"))
		return bench(argc > 2 ? atol(argv[2]) : 10000000);

	if (argc != 3 || strcmp(argv[1], "run"))
		return usage();

	for (i = 0; i < NR_TESTS; i++) {
		if (!strcmp(argv[2], "all") || !strcmp(argv[2], tests[i].name)) {
			found = true;
			ret |= run(&tests[i]);
		}
	}
	if (!found) {
		fprintf(stderr, "notify_test: no test named %s, see 'notify_test list'\n",
			argv[2]);
		return 2;
	}
	return ret ? 1 : 0;
}
