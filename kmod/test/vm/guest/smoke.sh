#!/bin/bash
# Unpatched or patched, the module must load, make, mount, do I/O and
# unmount cleanly in the guest.  Disks: /dev/vda (meta), /dev/vdb (data).
here=$(dirname "$(readlink -f "$0")")
. "$here/lib.sh"

load_scoutfs
mkfs_single /dev/vda /dev/vdb
mount_scoutfs /dev/vda /dev/vdb /mnt/scoutfs 0
log "mounted: $(grep ' /mnt/scoutfs ' /proc/mounts)"

head -c 1048576 /dev/urandom >/tmp/ref
cp /tmp/ref /mnt/scoutfs/file
mkdir /mnt/scoutfs/dir
echo hello >/mnt/scoutfs/dir/small
sync
echo 3 >/proc/sys/vm/drop_caches
cmp /tmp/ref /mnt/scoutfs/file || die "data read back differs"
[ "$(cat /mnt/scoutfs/dir/small)" = hello ] || die "small file read back wrong"
log "statfs: $("$SCOUTFS" statfs -p /mnt/scoutfs | tr '\n' ' ')"

umount /mnt/scoutfs
rmmod scoutfs
check_dmesg
log "smoke ok"
