/*
 * Copyright (C) 2026 The scoutfs-notify authors.  All rights reserved.
 *
 * This program is free software; you can redistribute it and/or
 * modify it under the terms of the GNU General Public
 * License v2 as published by the Free Software Foundation.
 *
 * This program is distributed in the hope that it will be useful,
 * but WITHOUT ANY WARRANTY; without even the implied warranty of
 * MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the GNU
 * General Public License for more details.
 */
#include <linux/kernel.h>
#include <linux/fs.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/pid.h>
#include <linux/cred.h>
#include <linux/capability.h>
#include <linux/uaccess.h>
#include <linux/wait.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/ktime.h>
#include <linux/timekeeping.h>
#include <linux/jiffies.h>

#include "format.h"
#include "ioctl.h"
#include "super.h"
#include "inode.h"
#include "counters.h"
#include "notify.h"
#include "scoutfs_trace.h"

/*
 * File access notification.
 *
 * Each mount has a ring of fixed size records that describe successful
 * opens and reads of regular files.  A single privileged reader
 * process drains it with an ioctl, typically a daemon that relays the
 * records to local consumers.  Nothing is emitted until a reader
 * attaches and the hooks only test a flag until then.
 *
 * Emitting is called from the open and read paths so it never sleeps,
 * allocates, or waits for the reader.  When the ring is full the record
 * is dropped but its sequence number is still consumed so the reader
 * sees a gap.  Everything runs in process context, in the syscalls of
 * the accessing tasks and of the reader, so the spinlock doesn't
 * disable interrupts.
 *
 * The drainer copies records to userspace straight out of the ring
 * without holding the spinlock.  That's safe because emitters only
 * write the free slots past the tail and only the drainer advances the
 * head, once the copy has succeeded, so a faulting copy loses nothing.
 * Reader state changes and drains are serialized by a mutex so that a
 * batch of records can't be copied twice.
 *
 * The ioctl handler in ioctl.c checks the caller and its arguments and
 * calls attach, wait, and drain, or detach.
 */

#define NOTIFY_RING_BYTES	(64 * 1024)
#define NOTIFY_RING_NR		(NOTIFY_RING_BYTES / \
				 sizeof(struct scoutfs_ioctl_notify_record))
#define NOTIFY_RING_MASK	(NOTIFY_RING_NR - 1)

struct notify_info {
	/* serializes the reader's attach, detach, and drains */
	struct mutex mutex;
	wait_queue_head_t waitq;

	/* emitters and the drainer */
	spinlock_t lock;
	struct scoutfs_ioctl_notify_record *ring;
	u64 head;		/* oldest stored record, advanced by drains */
	u64 tail;		/* where the next stored record goes */
	u64 next_seq;		/* seq of the last record emitted, stored or not */
	u64 dropped;		/* dropped since the reader attached */
	struct pid *reader;	/* the reader's tgid, or NULL */
};

#define DECLARE_NOTIFY_INFO(sb, name) \
	struct notify_info *name = SCOUTFS_SB(sb)->notify_info

static void emit(struct file *file, u16 type, u64 pos, u64 count, u32 flags)
{
	struct inode *inode = file_inode(file);
	struct super_block *sb = inode->i_sb;
	DECLARE_NOTIFY_INFO(sb, ninf);
	struct scoutfs_ioctl_notify_record *rec;
	u64 ino = scoutfs_ino(inode);
	u64 time_ns = ktime_get_real_ns();
	u32 pid = task_tgid_nr(current);
	u32 uid = from_kuid(&init_user_ns, current_fsuid());
	u32 gid = from_kgid(&init_user_ns, current_fsgid());
	bool stored = false;
	bool emitted = false;
	u64 seq = 0;
	u64 dropped = 0;

	spin_lock(&ninf->lock);
	/* the hook's unlocked test can race with detach */
	if (ninf->reader) {
		emitted = true;
		seq = ++ninf->next_seq;
		if (ninf->tail - ninf->head < NOTIFY_RING_NR) {
			rec = &ninf->ring[ninf->tail & NOTIFY_RING_MASK];
			rec->seq = cpu_to_le64(seq);
			rec->ino = cpu_to_le64(ino);
			rec->time_ns = cpu_to_le64(time_ns);
			rec->pos = cpu_to_le64(pos);
			rec->count = cpu_to_le64(count);
			rec->pid = cpu_to_le32(pid);
			rec->uid = cpu_to_le32(uid);
			rec->gid = cpu_to_le32(gid);
			rec->flags = cpu_to_le32(flags);
			rec->type = cpu_to_le16(type);
			rec->version = cpu_to_le16(SCOUTFS_IOC_NOTIFY_VERSION);
			memset(rec->_pad, 0, sizeof(rec->_pad));
			WRITE_ONCE(ninf->tail, ninf->tail + 1);
			stored = true;
		} else {
			dropped = ++ninf->dropped;
		}
	}
	spin_unlock(&ninf->lock);

	if (!emitted)
		return;

	scoutfs_inc_counter(sb, notify_emitted);
	if (!stored) {
		scoutfs_inc_counter(sb, notify_dropped_ring_full);
		trace_scoutfs_notify_drop(sb, ino, type, seq, dropped);
		return;
	}

	/*
	 * Order the stored tail before testing for waiters, this pairs
	 * with the barrier that prepare_to_wait gives the waiter before
	 * it tests the tail.
	 */
	smp_mb();
	if (waitqueue_active(&ninf->waitq)) /* ordered by smp_mb() above */
		wake_up(&ninf->waitq);
}

void scoutfs_notify_emit_open(struct file *file)
{
	emit(file, SCOUTFS_IOC_NOTIFY_OPEN, 0, 0, file->f_flags);
}

void scoutfs_notify_emit_read(struct file *file, loff_t pos, size_t count)
{
	emit(file, SCOUTFS_IOC_NOTIFY_READ, pos, count, 0);
}

/*
 * The reader's tgid pid stays referenced after its process exits.  The
 * process is gone once its pid has no task or its last thread has
 * started exiting, then another process can take over.
 */
static bool reader_alive(struct pid *reader)
{
	struct task_struct *task;
	bool alive;

	rcu_read_lock();
	task = pid_task(reader, PIDTYPE_PID);
	alive = task && atomic_read(&task->signal->live) > 0;
	rcu_read_unlock();

	return alive;
}

/*
 * Make the calling process the mount's reader, unless another live
 * process is.  Records left by an exited reader stay for the next one.
 */
int scoutfs_notify_attach(struct super_block *sb)
{
	DECLARE_NOTIFY_INFO(sb, ninf);
	struct pid *tgid = task_tgid(current);
	struct pid *old;
	u64 stored;
	int ret;

	mutex_lock(&ninf->mutex);
	if (ninf->reader == tgid) {
		ret = 0;
		goto out;
	}
	if (ninf->reader && reader_alive(ninf->reader)) {
		ret = -EBUSY;
		goto out;
	}

	spin_lock(&ninf->lock);
	old = ninf->reader;
	WRITE_ONCE(ninf->reader, get_pid(tgid));
	ninf->dropped = 0;
	stored = ninf->tail - ninf->head;
	spin_unlock(&ninf->lock);

	trace_scoutfs_notify_attach(sb, pid_nr(tgid), old ? pid_nr(old) : 0,
				    stored);
	put_pid(old);
	WRITE_ONCE(SCOUTFS_SB(sb)->notify_emitting, true);
	scoutfs_inc_counter(sb, notify_reader_attached);
	ret = 0;
out:
	mutex_unlock(&ninf->mutex);
	return ret;
}

/*
 * Stop emitting and empty the ring.  Only the reader can detach while
 * its process lives.
 */
int scoutfs_notify_detach(struct super_block *sb)
{
	DECLARE_NOTIFY_INFO(sb, ninf);
	struct pid *tgid = task_tgid(current);
	struct pid *old;
	u64 discarded;
	int ret;

	mutex_lock(&ninf->mutex);
	if (ninf->reader && ninf->reader != tgid &&
	    reader_alive(ninf->reader)) {
		ret = -EBUSY;
		goto out;
	}

	WRITE_ONCE(SCOUTFS_SB(sb)->notify_emitting, false);

	spin_lock(&ninf->lock);
	old = ninf->reader;
	WRITE_ONCE(ninf->reader, NULL);
	discarded = ninf->tail - ninf->head;
	WRITE_ONCE(ninf->head, ninf->tail);
	ninf->dropped = 0;
	spin_unlock(&ninf->lock);

	trace_scoutfs_notify_detach(sb, pid_nr(tgid), discarded);
	put_pid(old);
	/* other threads of the reader waiting for records return */
	wake_up(&ninf->waitq);
	ret = 0;
out:
	mutex_unlock(&ninf->mutex);
	return ret;
}

/*
 * Tested after the waiter is on the wait queue and in the sleeping
 * state, so it doesn't lock.  A stale answer is safe: drain checks
 * again under the lock and emit wakes after it stores.
 */
static bool ready_to_drain(struct notify_info *ninf, struct pid *tgid)
{
	return READ_ONCE(ninf->tail) != READ_ONCE(ninf->head) ||
	       READ_ONCE(ninf->reader) != tgid;
}

/*
 * Sleep until the ring has records, the caller stops being the reader,
 * or timeout_ms passes (0 waits without a timeout).  Returns -EINTR if
 * a signal arrived first, otherwise 0.
 */
int scoutfs_notify_wait(struct super_block *sb, u32 timeout_ms)
{
	DECLARE_NOTIFY_INFO(sb, ninf);
	struct pid *tgid = task_tgid(current);
	long timeout;
	long ret;

	timeout = timeout_ms ? msecs_to_jiffies(timeout_ms) :
			       MAX_SCHEDULE_TIMEOUT;
	ret = wait_event_interruptible_timeout(ninf->waitq,
					       ready_to_drain(ninf, tgid),
					       timeout);
	return ret < 0 ? -EINTR : 0;
}

/*
 * Copy up to nr of the oldest records and the dropped count to
 * userspace, and only then consume the records.  Returns the number of
 * records copied.
 */
int scoutfs_notify_drain(struct super_block *sb,
			 struct scoutfs_ioctl_notify_record __user *urecs,
			 u32 nr, u64 __user *udropped)
{
	const size_t size = sizeof(struct scoutfs_ioctl_notify_record);
	DECLARE_NOTIFY_INFO(sb, ninf);
	struct pid *tgid = task_tgid(current);
	u64 head;
	u64 dropped;
	u32 avail;
	u32 first;
	u32 idx;
	int ret;

	mutex_lock(&ninf->mutex);

	spin_lock(&ninf->lock);
	if (ninf->reader != tgid) {
		/* detached or taken over while we waited */
		spin_unlock(&ninf->lock);
		ret = ninf->reader ? -EBUSY : 0;
		goto out;
	}
	head = ninf->head;
	avail = min_t(u64, ninf->tail - head, nr);
	dropped = ninf->dropped;
	spin_unlock(&ninf->lock);

	idx = head & NOTIFY_RING_MASK;
	first = min_t(u32, avail, NOTIFY_RING_NR - idx);

	if (copy_to_user(urecs, &ninf->ring[idx], first * size) ||
	    copy_to_user(urecs + first, &ninf->ring[0], (avail - first) * size) ||
	    copy_to_user(udropped, &dropped, sizeof(dropped))) {
		ret = -EFAULT;
		goto out;
	}

	spin_lock(&ninf->lock);
	WRITE_ONCE(ninf->head, head + avail);
	spin_unlock(&ninf->lock);
	ret = avail;
out:
	mutex_unlock(&ninf->mutex);
	return ret;
}

int scoutfs_notify_setup(struct super_block *sb)
{
	struct scoutfs_sb_info *sbi = SCOUTFS_SB(sb);
	struct notify_info *ninf;

	BUILD_BUG_ON(sizeof(struct scoutfs_ioctl_notify_record) != 64);
	BUILD_BUG_ON(NOTIFY_RING_NR & NOTIFY_RING_MASK);

	ninf = kzalloc(sizeof(struct notify_info), GFP_KERNEL);
	if (!ninf)
		return -ENOMEM;

	ninf->ring = vmalloc(NOTIFY_RING_BYTES);
	if (!ninf->ring) {
		kfree(ninf);
		return -ENOMEM;
	}

	mutex_init(&ninf->mutex);
	init_waitqueue_head(&ninf->waitq);
	spin_lock_init(&ninf->lock);

	sbi->notify_info = ninf;
	return 0;
}

/*
 * Called from put_super, also after a failed mount that may not have
 * set up the info.  No files are open so nothing can be emitting or
 * draining.
 */
void scoutfs_notify_destroy(struct super_block *sb)
{
	struct scoutfs_sb_info *sbi = SCOUTFS_SB(sb);
	struct notify_info *ninf = sbi->notify_info;

	if (ninf) {
		WRITE_ONCE(sbi->notify_emitting, false);
		put_pid(ninf->reader);
		vfree(ninf->ring);
		kfree(ninf);
		sbi->notify_info = NULL;
	}
}
