#ifndef _SCOUTFS_NOTIFY_H_
#define _SCOUTFS_NOTIFY_H_

#include "ioctl.h"

/*
 * The hooks sit in the open and read paths of every regular file.
 * Without a reader they cost one unlikely branch on a flag in the sb
 * info that's read without locking, the rest of the notify info is
 * private to notify.c.  A reader that attaches sees records from hooks
 * that test the flag after it was set, records racing with the attach
 * are harmlessly lost.
 */
static inline bool scoutfs_notify_emitting(struct super_block *sb)
{
	return unlikely(READ_ONCE(SCOUTFS_SB(sb)->notify_emitting));
}

void scoutfs_notify_emit_open(struct file *file);
void scoutfs_notify_emit_read(struct file *file, loff_t pos, size_t count);

static inline void scoutfs_notify_open(struct file *file)
{
	if (scoutfs_notify_emitting(file_inode(file)->i_sb))
		scoutfs_notify_emit_open(file);
}

static inline void scoutfs_notify_read(struct file *file, loff_t pos,
				       ssize_t ret)
{
	if (scoutfs_notify_emitting(file_inode(file)->i_sb) && ret > 0)
		scoutfs_notify_emit_read(file, pos, ret);
}

int scoutfs_notify_attach(struct super_block *sb);
int scoutfs_notify_detach(struct super_block *sb);
int scoutfs_notify_wait(struct super_block *sb, u32 timeout_ms);
int scoutfs_notify_drain(struct super_block *sb,
			 struct scoutfs_ioctl_notify_record __user *urecs,
			 u32 nr, u64 __user *udropped);

int scoutfs_notify_setup(struct super_block *sb);
void scoutfs_notify_destroy(struct super_block *sb);

#endif
