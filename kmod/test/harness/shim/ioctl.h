#ifndef _KSHIM_IOCTL_H_
#define _KSHIM_IOCTL_H_

#include "kshim.h"
#include <linux/ioctl.h>

/*
 * The part of scoutfs ioctl.h that the series adds, after the magic
 * that every scoutfs ioctl uses.
 */
#define SCOUTFS_IOCTL_MAGIC 0xE8

#include "ioctl-read-notify.h"

/* the ioctl handlers' entry point, ../ioctl.c */
long scoutfs_ioctl(struct file *file, unsigned int cmd, unsigned long arg);

#endif
