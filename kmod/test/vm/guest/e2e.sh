#!/bin/bash
# The patched module end to end (e2e.py), between a clean start and a clean
# finish: two mounts of one filesystem, each through its own dm-linear
# devices as run-tests.sh makes them; module unload and dmesg checked last.
#
#   e2e.sh VENV_BIN OUTDIR
#
# Disks: /dev/vda (meta), /dev/vdb (data).
here=$(dirname "$(readlink -f "$0")")
. "$here/lib.sh"
bin=$1
out=$2
mkdir -p "$out"

load_scoutfs
# mkfs opens the disks exclusively: before any dm device holds them
mkfs_single /dev/vda /dev/vdb
export DM_DISABLE_UDEV=1
for m in a b; do
	for d in vda:meta vdb:data; do
		dmsetup create --noudevsync "e2e_${d#*:}_$m" \
			--table "0 $(blockdev --getsz "/dev/${d%%:*}") linear /dev/${d%%:*} 0"
	done
done
dmsetup mknodes
# one quorum member (A); B mounts as a client of A's server
mount_scoutfs /dev/mapper/e2e_meta_a /dev/mapper/e2e_data_a /mnt/a 0
mkdir -p /mnt/b
mount -t scoutfs -o metadev_path=/dev/mapper/e2e_meta_b /dev/mapper/e2e_data_b /mnt/b
log "mounted /mnt/a and /mnt/b"

rc=0
PYTHONPATH=$here "$bin/python" -u "$here/e2e.py" /mnt/a /mnt/b "$bin" "$out" || rc=$?

# whatever e2e.py left: B first (a client), then the server A
for m in /mnt/overlay /mnt/b /mnt/a; do
	if grep -q " $m " /proc/mounts; then
		umount "$m" || die "umount $m failed"
	fi
done
rmmod scoutfs || die "rmmod scoutfs failed: a reference leaked"
check_dmesg
[ "$rc" = 0 ] && log "e2e ok"
exit "$rc"
