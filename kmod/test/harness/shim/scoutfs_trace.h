#ifndef _KSHIM_SCOUTFS_TRACE_H_
#define _KSHIM_SCOUTFS_TRACE_H_

#include "kshim.h"

/*
 * The notify tracepoints (../../../src/trace/notify.h) count their
 * calls and keep the last arguments, so that tests can check that
 * they fire.
 */
struct kshim_trace {
	atomic_long attach;
	atomic_long detach;
	atomic_long drop;
	int pid;
	int prev_pid;
	u64 stored;
	u64 discarded;
	u64 seq;
	u64 dropped;
};

extern struct kshim_trace kshim_trace;

static inline void trace_scoutfs_notify_attach(struct super_block *sb, int pid,
					       int prev_pid, u64 stored)
{
	kshim_trace.pid = pid;
	kshim_trace.prev_pid = prev_pid;
	kshim_trace.stored = stored;
	atomic_fetch_add(&kshim_trace.attach, 1);
}

static inline void trace_scoutfs_notify_detach(struct super_block *sb, int pid,
					       u64 discarded)
{
	kshim_trace.pid = pid;
	kshim_trace.discarded = discarded;
	atomic_fetch_add(&kshim_trace.detach, 1);
}

static inline void trace_scoutfs_notify_drop(struct super_block *sb, u64 ino,
					     u16 type, u64 seq, u64 dropped)
{
	__atomic_store_n(&kshim_trace.seq, seq, __ATOMIC_RELAXED);
	__atomic_store_n(&kshim_trace.dropped, dropped, __ATOMIC_RELAXED);
	atomic_fetch_add(&kshim_trace.drop, 1);
}

#endif
