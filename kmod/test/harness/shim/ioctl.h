/* notify.c only needs the ioctl magic from scoutfs ioctl.h */
#define SCOUTFS_IOCTL_MAGIC 0xE8
