#!/bin/bash
# Guest side of the kernel ioctl test: mount the patched scoutfs, run
# ioctl-probe.py against it, unmount, and fail on any kernel complaint.
#
#	ioctl-probe.sh PYTHON	(a python with this project importable)
#
# Disks: /dev/vda (meta), /dev/vdb (data); SCOUTFS_BUILD: a build-scoutfs
# OUTDIR with the patched scoutfs.ko and the utils.
here=$(dirname "$(readlink -f "$0")")
. "$here/vm/guest/lib.sh"

python=${1:?usage: ioctl-probe.sh PYTHON}

load_scoutfs
mkfs_single /dev/vda /dev/vdb
mount_scoutfs /dev/vda /dev/vdb /mnt/scoutfs 0
sysfs=$(sysfs_dir_of /mnt/scoutfs) || die "no sysfs directory for /mnt/scoutfs"

"$python" "$here/ioctl-probe.py" /mnt/scoutfs "$sysfs" || die "ioctl-probe.py failed"

# unmount with records left in a ring whose reader exited
umount /mnt/scoutfs
rmmod scoutfs
check_dmesg
log "ioctl probe ok"
