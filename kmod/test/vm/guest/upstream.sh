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
# Three mounts, but the tests of WIDE use more (mmap: T_D3, totl-merge-read:
# t_require_mounts 5, srch-safe-merge-pos: a golden output line per mount of
# upstream's five): they run in a second run-tests.sh pass with WIDE_MOUNTS
# mounts, results in RESULTS/wide.
#
# compat/ comes first in PATH: tools as the distributions scoutfs's CI runs
# on behave (compat/stat).
here=$(dirname "$(readlink -f "$0")")
tree=$1
results=$2
shift 2
export SCOUTFS_BUILD=$tree/utils/src
. "$here/lib.sh"

modprobe -a virtio_blk dm_mod libcrc32c
export PATH=$here/compat:$PATH
WIDE="mmap totl-merge-read srch-safe-merge-pos"
WIDE_MOUNTS=5
# no udevd in the guest: dmsetup must not wait for it
export DM_DISABLE_UDEV=1

if [ -n "${NOTIFY_READER_BIN:-}" ]; then
	# run-tests.sh and the tests call mount/umount through PATH
	export NOTIFY_READER_BIN PATH=$here/wrap:$PATH
	log "scoutfs-notifyd from $NOTIFY_READER_BIN attaches to every scoutfs mount"
fi

# run_tests NR_MOUNTS RESULTS TEST...: one run-tests.sh pass, summary in RESULTS/summary.tsv
run_tests() {
	local nr=$1 res=$2 t rc=0
	shift 2
	local includes=()
	for t in "$@"; do
		includes+=(-I "^$t.sh\$")
	done
	mkdir -p "$res"
	(cd "$tree/tests" && ./run-tests.sh -M /dev/vda -D /dev/vdb -f /dev/vdc -e /dev/vdd \
		-m -i -s -n "$nr" -q 1 -o quorum_heartbeat_timeout_ms=60000 -r "$res" \
		"${includes[@]}") 2>&1 | tee "$res/stdout.txt" || rc=$?
	sed -n -E 's/^  ([a-z0-9_-]+) .*(passed|failed|skipped).*/\1\t\2/p' "$res/stdout.txt" \
		>"$res/summary.tsv"
	return "$rc"
}

narrow=()
wide=()
for t in "$@"; do
	case " $WIDE " in
	*" $t "*) wide+=("$t") ;;
	*) narrow+=("$t") ;;
	esac
done
mkdir -p "$results"
rc=0
: >"$results/summary.tsv"
if [ ${#narrow[@]} -gt 0 ]; then
	run_tests 3 "$results" "${narrow[@]}" || rc=$?
fi
if [ ${#wide[@]} -gt 0 ]; then
	# the first pass's mounts are gone: run-tests.sh unmounts them when it ends
	run_tests "$WIDE_MOUNTS" "$results/wide" "${wide[@]}" || rc=$?
	cat "$results/wide/summary.tsv" >>"$results/summary.tsv"
fi
log "run-tests.sh exited $rc; summary:"
cat "$results/summary.tsv"
if [ -s "$results/fail.log" ]; then
	log "fail.log:"
	cat "$results/fail.log"
fi

# leftover mounts (run-tests.sh keeps them after a failure) must unmount
# cleanly: clients first, the quorum member (test.0) last, one at a time
# (prepare-upstream-tests says why)
for m in $(findmnt -n -t scoutfs -o TARGET | sort -r); do
	umount "$m"
done
if [ -n "${NOTIFY_READER_BIN:-}" ]; then
	"$here/wrap/readers" check
fi
check_dmesg
exit "$rc"
