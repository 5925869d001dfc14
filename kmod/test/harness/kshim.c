/*
 * The out of line parts of the kernel API shim, see shim/kshim.h.
 */
#include "kshim.h"
#include "scoutfs_trace.h"

#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

__thread struct task_struct *kshim_current;
struct kshim_trace kshim_trace;
struct user_namespace init_user_ns;

static atomic_long allocations;

void *kzalloc(size_t size, int gfp)
{
	void *ptr = calloc(1, size);

	(void)gfp;
	if (ptr)
		atomic_fetch_add(&allocations, 1);
	return ptr;
}

void kfree(const void *ptr)
{
	if (ptr)
		atomic_fetch_sub(&allocations, 1);
	free((void *)ptr);
}

/* uninitialized, like the kernel's, so reading unwritten slots shows */
void *vmalloc(unsigned long size)
{
	void *ptr = malloc(size);

	if (ptr) {
		memset(ptr, 0xa5, size);
		atomic_fetch_add(&allocations, 1);
	}
	return ptr;
}

void vfree(const void *ptr)
{
	kfree(ptr);
}

long kshim_allocations(void)
{
	return atomic_load(&allocations);
}

struct pid *get_pid(struct pid *pid)
{
	if (pid)
		atomic_fetch_add(&pid->count, 1);
	return pid;
}

void put_pid(struct pid *pid)
{
	if (pid)
		atomic_fetch_sub(&pid->count, 1);
}

struct task_struct *pid_task(struct pid *pid, enum pid_type type)
{
	(void)type;
	return atomic_load(&pid->task);
}

/* the kernel copies what it can and returns the bytes it couldn't */
static unsigned long copy_user(void *to, const void *from, unsigned long n,
			       bool to_user)
{
	struct iovec local;
	struct iovec remote;
	ssize_t done;

	if (n == 0)
		return 0;

	local.iov_base = to_user ? (void *)from : to;
	local.iov_len = n;
	remote.iov_base = to_user ? to : (void *)from;
	remote.iov_len = n;

	if (to_user)
		done = process_vm_writev(getpid(), &local, 1, &remote, 1, 0);
	else
		done = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);

	return done < 0 ? n : n - done;
}

unsigned long copy_to_user(void __user *to, const void *from, unsigned long n)
{
	return copy_user(to, from, n, true);
}

unsigned long copy_from_user(void *to, const void __user *from, unsigned long n)
{
	return copy_user(to, from, n, false);
}

u64 ktime_get_real_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (u64)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

atomic_int kshim_waiting;
pthread_mutex_t kshim_sched_lock = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t kshim_sched_cond;

static pthread_once_t sched_once = PTHREAD_ONCE_INIT;

static void sched_init(void)
{
	pthread_condattr_t attr;

	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&kshim_sched_cond, &attr);
	pthread_condattr_destroy(&attr);
}

void init_waitqueue_head(wait_queue_head_t *wq)
{
	pthread_once(&sched_once, sched_init);
	atomic_store(&wq->waiters, 0);
}

void wake_up(wait_queue_head_t *wq)
{
	(void)wq;
	pthread_mutex_lock(&kshim_sched_lock);
	pthread_cond_broadcast(&kshim_sched_cond);
	pthread_mutex_unlock(&kshim_sched_lock);
}

void kshim_signal(struct task_struct *task)
{
	pthread_mutex_lock(&kshim_sched_lock);
	atomic_store(&task->sigpending, true);
	pthread_cond_broadcast(&kshim_sched_cond);
	pthread_mutex_unlock(&kshim_sched_lock);
}

void kshim_deadline(struct timespec *ts, long timeout)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	if (timeout == MAX_SCHEDULE_TIMEOUT)
		return;
	ts->tv_sec += timeout / 1000;
	ts->tv_nsec += (timeout % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

bool kshim_past(const struct timespec *ts)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return now.tv_sec > ts->tv_sec ||
	       (now.tv_sec == ts->tv_sec && now.tv_nsec >= ts->tv_nsec);
}
