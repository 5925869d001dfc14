#!/bin/bash
# The cluster stream on the patched module (cluster.py): two mounts of one
# filesystem through their own dm-linear devices (as e2e.sh makes them), a
# daemon and a forwarder per mount, a NATS server in the guest, the shim with
# --nats on mount A; module unload and dmesg checked last.
#
#   cluster.sh VENV_BIN OUTDIR
#
# Disks: /dev/vda (meta), /dev/vdb (data).
here=$(dirname "$(readlink -f "$0")")
. "$here/lib.sh"
bin=$1
out=$2
mkdir -p "$out"

load_scoutfs
mkfs_single /dev/vda /dev/vdb
export DM_DISABLE_UDEV=1
for m in a b; do
	for d in vda:meta vdb:data; do
		dmsetup create --noudevsync "cl_${d#*:}_$m" \
			--table "0 $(blockdev --getsz "/dev/${d%%:*}") linear /dev/${d%%:*} 0"
	done
done
dmsetup mknodes
mount_scoutfs /dev/mapper/cl_meta_a /dev/mapper/cl_data_a /mnt/a 0
mkdir -p /mnt/b
mount -t scoutfs -o metadev_path=/dev/mapper/cl_meta_b /dev/mapper/cl_data_b /mnt/b
log "mounted /mnt/a and /mnt/b"

rc=0
"$bin/python" -u "$here/cluster.py" /mnt/a /mnt/b "$bin" "$out" || rc=$?

for m in /mnt/overlay /mnt/b /mnt/a; do
	if grep -q " $m " /proc/mounts; then
		umount "$m" || umount -l "$m" || die "umount $m failed"
	fi
done
rmmod scoutfs || die "rmmod scoutfs failed: a reference leaked"
check_dmesg
[ "$rc" = 0 ] && log "cluster ok"
exit "$rc"
