/*
 * Stands in for scoutfs ioctl.c: the dispatch and the READ_NOTIFY
 * handler the series adds there, included from the very file that
 * gen-series inserts.
 */
#include "kshim.h"
#include "super.h"
#include "ioctl.h"
#include "notify.h"

#include "ioctl-read-notify.c"

long scoutfs_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	switch (cmd) {
	case SCOUTFS_IOC_READ_NOTIFY:
		return scoutfs_ioc_read_notify(file, arg);
	}

	return -ENOTTY;
}
