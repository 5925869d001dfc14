#!/bin/bash
# Run a subset of scoutfs's own tests/run-tests.sh in the guest.
#
#   upstream.sh TREE RESULTS TEST...
#
# TREE comes from prepare-upstream-tests; RESULTS (on the work share) gets
# run-tests.sh's results dir and summary.tsv ("name<TAB>passed|failed|
# skipped").  Disks: /dev/vda meta, /dev/vdb data, /dev/vdc and /dev/vdd
# the extra devices, each >= 64 GiB (sparse).
#
# With NOTIFY_READER_BIN set to the project's venv bin dir, every scoutfs
# mount the tests make gets scoutfs-notifyd attached as its notify reader
# before any test runs, stopped just before it is unmounted (wrap/).
#
# One quorum member and the longest heartbeat timeout: under tcg on a busy
# host a starved leader otherwise loses its term mid-test and gets fenced.
here=$(dirname "$(readlink -f "$0")")
tree=$1
results=$2
shift 2
export SCOUTFS_BUILD=$tree/utils/src
. "$here/lib.sh"

modprobe -a virtio_blk dm_mod libcrc32c
# no udevd in the guest: dmsetup must not wait for it
export DM_DISABLE_UDEV=1

if [ -n "${NOTIFY_READER_BIN:-}" ]; then
	# run-tests.sh and the tests call mount/umount through PATH
	export NOTIFY_READER_BIN PATH=$here/wrap:$PATH
	log "scoutfs-notifyd from $NOTIFY_READER_BIN attaches to every scoutfs mount"
fi

includes=()
for t in "$@"; do
	includes+=(-I "^$t.sh\$")
done
mkdir -p "$results"
rc=0
(cd "$tree/tests" && ./run-tests.sh -M /dev/vda -D /dev/vdb -f /dev/vdc -e /dev/vdd \
	-m -i -s -n 3 -q 1 -o quorum_heartbeat_timeout_ms=60000 -r "$results" "${includes[@]}") 2>&1 | tee "$results/stdout.txt" || rc=$?

sed -n -E 's/^  ([a-z0-9_-]+) .*(passed|failed|skipped).*/\1\t\2/p' "$results/stdout.txt" \
	>"$results/summary.tsv"
log "run-tests.sh exited $rc; summary:"
cat "$results/summary.tsv"
if [ -s "$results/fail.log" ]; then
	log "fail.log:"
	cat "$results/fail.log"
fi

# leftover mounts (run-tests.sh keeps them after a failure) must unmount cleanly
for m in $(findmnt -n -t scoutfs -o TARGET | sort -r); do
	umount "$m" &
done
wait
if [ -n "${NOTIFY_READER_BIN:-}" ]; then
	"$here/wrap/readers" check
fi
check_dmesg
exit "$rc"
