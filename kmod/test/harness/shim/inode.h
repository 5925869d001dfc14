#ifndef _KSHIM_INODE_H_
#define _KSHIM_INODE_H_

#include "kshim.h"

static inline u64 scoutfs_ino(struct inode *inode)
{
	return inode->ino;
}

#endif
