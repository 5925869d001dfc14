#!/bin/bash
# The patched module under faults (faults.py), on two mounts of one
# filesystem made as e2e.sh makes them; then the module must unload and
# dmesg stay clean, recorded as the last result, unload_clean.
#
#   faults.sh VENV_BIN OUTDIR
#
# Disks: /dev/vda (meta), /dev/vdb (data).  OUTDIR/results.tsv: one line per
# fault, "NAME<TAB>passed|failed<TAB>detail".
here=$(dirname "$(readlink -f "$0")")
. "$here/lib.sh"
bin=$1
out=$2
mkdir -p "$out"
results=$out/results.tsv
: >"$results"

load_scoutfs
mkfs_single /dev/vda /dev/vdb
export DM_DISABLE_UDEV=1
for m in a b; do
	for d in vda:meta vdb:data; do
		dmsetup create --noudevsync "f_${d#*:}_$m" \
			--table "0 $(blockdev --getsz "/dev/${d%%:*}") linear /dev/${d%%:*} 0"
	done
done
dmsetup mknodes
mount_scoutfs /dev/mapper/f_meta_a /dev/mapper/f_data_a /mnt/a 0
mkdir -p /mnt/b
mount -t scoutfs -o metadev_path=/dev/mapper/f_meta_b /dev/mapper/f_data_b /mnt/b
log "mounted /mnt/a and /mnt/b"

rc=0
PYTHONPATH=$here "$bin/python" -u "$here/faults.py" /mnt/a /mnt/b "$bin" "$out" || rc=$?

# whatever faults.py left: B first (a client), then the server A
why=
for m in /mnt/b /mnt/a; do
	if grep -q " $m " /proc/mounts && ! umount "$m" 2>"$out/umount.err"; then
		why="umount $m: $(cat "$out/umount.err")"
		break
	fi
done
if [ -z "$why" ] && ! rmmod scoutfs 2>"$out/rmmod.err"; then
	why="rmmod scoutfs: $(cat "$out/rmmod.err") (a reference leaked)"
fi
if [ -z "$why" ] && (check_dmesg) >"$out/dmesg-check.out" 2>&1; then
	printf 'unload_clean\tpassed\tmodule unloaded, dmesg clean\n' >>"$results"
else
	[ -n "$why" ] || why=$(grep FAIL "$out/dmesg-check.out" | tr '\t\n' '  ')
	printf 'unload_clean\tfailed\t%s\n' "$why" >>"$results"
	rc=1
fi
cat "$results"
[ "$rc" = 0 ] && log "faults ok"
exit "$rc"
