#ifndef _KSHIM_SUPER_H_
#define _KSHIM_SUPER_H_

#include "kshim.h"

struct notify_info;

/* the counters notify.c bumps, percpu_counters in scoutfs */
struct scoutfs_counters {
	atomic_ullong notify_dropped_ring_full;
	atomic_ullong notify_emitted;
	atomic_ullong notify_reader_attached;
};

/* the fields the notify patch adds to scoutfs's sb info */
struct scoutfs_sb_info {
	struct notify_info *notify_info;
	bool notify_emitting;
	struct scoutfs_counters counters;
};

static inline struct scoutfs_sb_info *SCOUTFS_SB(struct super_block *sb)
{
	return sb->s_fs_info;
}

#endif
