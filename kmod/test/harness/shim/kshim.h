#ifndef _KSHIM_H_
#define _KSHIM_H_

/*
 * Just enough of the kernel API for notify.c to build and run in
 * userspace, so that the ring and ioctl can be tested and benchmarked
 * with threads.  Every <linux/...> header notify.c includes resolves
 * here.  The mapping:
 *
 *  - spinlock_t and struct mutex are pthread mutexes; irqs don't exist.
 *  - wait queues are a mutex and condvar, signals are a per-task flag
 *    that kshim_signal() sets before waking the queue.
 *  - copy_{to,from}_user go through process_vm_{writev,readv} on our
 *    own pid so that a bad user pointer fails with EFAULT instead of
 *    crashing, as it would in the kernel.
 *  - current is a thread-local task; tasks, their tgid pids, fsuid/gid
 *    and CAP_SYS_ADMIN are made by the test.  A pid is reaped by
 *    clearing its task, a process exits by clearing signal->live.
 *  - percpu counters are atomics, jiffies are milliseconds.
 *  - allocations and pid references are counted to find leaks.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <endian.h>
#include <sys/types.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef uint16_t __le16;
typedef uint32_t __le32;
typedef uint64_t __le64;

#define __user
#define likely(x)	__builtin_expect(!!(x), 1)
#define unlikely(x)	__builtin_expect(!!(x), 0)
/* relaxed atomics: what the kernel's mean, and what ThreadSanitizer knows */
#define READ_ONCE(x)	__atomic_load_n(&(x), __ATOMIC_RELAXED)
#define WRITE_ONCE(x, val) __atomic_store_n(&(x), (val), __ATOMIC_RELAXED)
#define smp_mb()	atomic_thread_fence(memory_order_seq_cst)
#define U32_MAX		((u32)~0U)

/* the first byte that isn't c, or NULL */
static inline void *memchr_inv(const void *start, int c, size_t bytes)
{
	const unsigned char *p = start;

	for (; bytes; p++, bytes--)
		if (*p != (unsigned char)c)
			return (void *)p;
	return NULL;
}

#define BUILD_BUG_ON(cond) _Static_assert(!(cond), #cond)
#define min_t(type, a, b) \
	((type)(a) < (type)(b) ? (type)(a) : (type)(b))

#define cpu_to_le16(v)	htole16(v)
#define cpu_to_le32(v)	htole32(v)
#define cpu_to_le64(v)	htole64(v)

#define ERESTARTSYS	512

#define GFP_KERNEL	0
void *kzalloc(size_t size, int gfp);
void kfree(const void *ptr);
void *vmalloc(unsigned long size);
void vfree(const void *ptr);

typedef pthread_mutex_t spinlock_t;
#define spin_lock_init(l)	pthread_mutex_init((l), NULL)
#define spin_lock(l)		pthread_mutex_lock(l)
#define spin_unlock(l)		pthread_mutex_unlock(l)

struct mutex {
	pthread_mutex_t m;
};
#define mutex_init(x)		pthread_mutex_init(&(x)->m, NULL)
#define mutex_lock(x)		pthread_mutex_lock(&(x)->m)
#define mutex_unlock(x)		pthread_mutex_unlock(&(x)->m)

/* tasks, pids and credentials */
struct signal_struct {
	atomic_int live;
};

struct pid;

struct task_struct {
	struct pid *tgid;
	struct signal_struct *signal;
	bool cap_sys_admin;
	u32 fsuid;
	u32 fsgid;
	atomic_bool sigpending;
};

struct pid {
	atomic_int count;
	int nr;
	struct task_struct *_Atomic task;
};

extern __thread struct task_struct *kshim_current;
#define current kshim_current

enum pid_type { PIDTYPE_PID };

#define rcu_read_lock()		do { } while (0)
#define rcu_read_unlock()	do { } while (0)
#define atomic_read(a)		atomic_load(a)

struct pid *get_pid(struct pid *pid);
void put_pid(struct pid *pid);
struct task_struct *pid_task(struct pid *pid, enum pid_type type);

static inline struct pid *task_tgid(struct task_struct *task)
{
	return task->tgid;
}

static inline pid_t pid_nr(struct pid *pid)
{
	return pid ? pid->nr : 0;
}

static inline pid_t task_tgid_nr(struct task_struct *task)
{
	return task->tgid->nr;
}

typedef struct { u32 val; } kuid_t;
typedef struct { u32 val; } kgid_t;
struct user_namespace { int unused; };
extern struct user_namespace init_user_ns;
#define current_fsuid()		((kuid_t){ current->fsuid })
#define current_fsgid()		((kgid_t){ current->fsgid })
#define from_kuid(ns, k)	((void)(ns), (k).val)
#define from_kgid(ns, k)	((void)(ns), (k).val)

#define CAP_SYS_ADMIN		21
#define capable(cap)		((void)(cap), current->cap_sys_admin)

unsigned long copy_to_user(void __user *to, const void *from, unsigned long n);
unsigned long copy_from_user(void *to, const void __user *from, unsigned long n);

u64 ktime_get_real_ns(void);

/* files */
/* loff_t comes from <sys/types.h> with _GNU_SOURCE */

struct super_block {
	void *s_fs_info;
};

struct inode {
	struct super_block *i_sb;
	u64 ino;
};

struct file {
	struct inode *f_inode;
	unsigned int f_flags;
};

static inline struct inode *file_inode(const struct file *file)
{
	return file->f_inode;
}

/*
 * Wait queues count their waiters, sleeping and waking all go through
 * one mutex and condvar so that kshim_signal() can wake any task
 * without knowing which queue it sleeps on.  A wakeup lost by the code
 * under test leaves its waiter asleep and the test hangs.
 */
typedef struct {
	atomic_int waiters;
} wait_queue_head_t;

extern pthread_mutex_t kshim_sched_lock;
extern pthread_cond_t kshim_sched_cond;

void init_waitqueue_head(wait_queue_head_t *wq);
void wake_up(wait_queue_head_t *wq);
#define waitqueue_active(wq)	(atomic_load(&(wq)->waiters) > 0)

#define MAX_SCHEDULE_TIMEOUT	LONG_MAX
#define msecs_to_jiffies(ms)	((long)(ms))

/* tasks in wait_event_*, so tests know that a waiter is asleep */
extern atomic_int kshim_waiting;

/* a signal for task: its interruptible waits return -ERESTARTSYS */
void kshim_signal(struct task_struct *task);

/* the deadline of a wait of timeout jiffies from now */
void kshim_deadline(struct timespec *ts, long timeout);
bool kshim_past(const struct timespec *ts);

/*
 * Returns the remaining jiffies (at least 1) once cond is true, 0 after
 * the timeout with cond false, -ERESTARTSYS on a pending signal.
 */
#define wait_event_interruptible_timeout(wq, cond, timeout)		\
({									\
	long __to = (timeout);						\
	long __ret = __to;						\
	struct timespec __ts;						\
									\
	kshim_deadline(&__ts, __to);					\
	pthread_mutex_lock(&kshim_sched_lock);				\
	atomic_fetch_add(&(wq).waiters, 1);				\
	atomic_fetch_add(&kshim_waiting, 1);				\
	for (;;) {							\
		if (cond) {						\
			__ret = 1;					\
			break;						\
		}							\
		if (atomic_load(&current->sigpending)) {		\
			__ret = -ERESTARTSYS;				\
			break;						\
		}							\
		if (__to == MAX_SCHEDULE_TIMEOUT) {			\
			pthread_cond_wait(&kshim_sched_cond,		\
					  &kshim_sched_lock);		\
		} else if (kshim_past(&__ts)) {				\
			__ret = (cond) ? 1 : 0;				\
			break;						\
		} else {						\
			pthread_cond_timedwait(&kshim_sched_cond,	\
					       &kshim_sched_lock, &__ts); \
		}							\
	}								\
	atomic_fetch_sub(&kshim_waiting, 1);				\
	atomic_fetch_sub(&(wq).waiters, 1);				\
	pthread_mutex_unlock(&kshim_sched_lock);			\
	__ret;								\
})

/* leak accounting */
long kshim_allocations(void);

#endif
