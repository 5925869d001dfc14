# Sourced by the guest scripts: load, make and mount scoutfs in the VM.
#
# Expects SCOUTFS_BUILD (a build-scoutfs OUTDIR: scoutfs.ko, scoutfs) in the
# environment.  Disks are the run-guest --disk images, /dev/vda onwards.

set -euo pipefail

: "${SCOUTFS_BUILD:?SCOUTFS_BUILD (a build-scoutfs OUTDIR) is not set}"
SCOUTFS=$SCOUTFS_BUILD/scoutfs
export PATH=$SCOUTFS_BUILD:$PATH

log() {
	echo "guest: $*"
}

die() {
	echo "guest: FAIL: $*"
	exit 1
}

# modules from the host's /lib/modules (the guest boots that very kernel)
load_scoutfs() {
	modprobe -a virtio_blk libcrc32c loop dm_mod fuse
	insmod "$SCOUTFS_BUILD/scoutfs.ko"
	log "loaded scoutfs.ko ($(modinfo -F version "$SCOUTFS_BUILD/scoutfs.ko" 2>/dev/null || echo '?'))"
}

# mkfs_single META DATA: a one-quorum-slot filesystem over lo
mkfs_single() {
	"$SCOUTFS" mkfs -A -f -Q 0,127.0.0.1,42000 "$1" "$2" >/dev/null
}

# mount_scoutfs META DATA MNT SLOT [extra options]
mount_scoutfs() {
	local opts="metadev_path=$1,quorum_slot_nr=$4${5:+,$5}"
	mkdir -p "$3"
	mount -t scoutfs -o "$opts" "$2" "$3"
}

# the sysfs directory of the scoutfs mount at $1
sysfs_dir_of() {
	local fsid rid d
	fsid=$("$SCOUTFS" statfs -s fsid -p "$1")
	rid=$("$SCOUTFS" statfs -s rid -p "$1")
	for d in /sys/fs/scoutfs/*; do
		if [ "$(cat "$d/fsid")" = "$fsid" ] && [ "$(cat "$d/rid")" = "$rid" ]; then
			echo "$d"
			return 0
		fi
	done
	return 1
}

# Fail on kernel trouble the guest survived (panic_on_warn catches WARN
# itself; this catches leak reports and BUG lines printed without a panic).
check_dmesg() {
	local bad
	# not the lines that only name a test (run-tests.sh's "run scoutfs
	# test lock-refleak", the work dir on the command line)
	if bad=$(dmesg | grep -v -E 'run scoutfs test |Command line:' |
		grep -E 'BUG:|WARNING:|Oops|leak|kmemleak|general protection|Call Trace' | head -n 5) &&
		[ -n "$bad" ]; then
		dmesg | tail -n 60
		die "kernel trouble in dmesg: $bad"
	fi
}
