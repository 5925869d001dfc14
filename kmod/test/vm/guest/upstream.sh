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
# mounts, results in RESULTS/wide.  The tests of QUORUM skip whenever every
# quorum member is needed for a majority, as with one, or need a new leader
# elected while the old one is gone: they run in a third pass as upstream's
# CI mounts, QUORUM_MOUNTS mounts of which QUORUM_MEMBERS
# are quorum members, results in RESULTS/quorum.  The heartbeat timeout is
# already v1.30's longest (60 s), and a member that mounts while a server
# runs waits that long for heartbeats before it stands, so a starved leader
# still keeps its term unless it sends nothing for a whole minute.
#
# compat/ comes first in PATH: tools as the distributions scoutfs's CI runs
# on behave (compat/stat).
here=$(dirname "$(readlink -f "$0")")
tree=$1
results=$2
shift 2
export SCOUTFS_BUILD=$tree/utils/src
. "$here/lib.sh"

# loop: change-devices makes its scratch filesystems on loop devices
modprobe -a virtio_blk dm_mod libcrc32c loop
export PATH=$here/compat:$PATH
# prepare-upstream-tests put Debian's gawk in TREE/gawk
"$here/use-gawk" "$tree/gawk" || die "no gawk in the guest"
WIDE="mmap totl-merge-read srch-safe-merge-pos"
WIDE_MOUNTS=5
QUORUM="lock-recover-invalidate mount-unmount-race client-unmount-recovery"
QUORUM+=" fence-and-reclaim quorum-heartbeat-timeout"
QUORUM_MOUNTS=5
QUORUM_MEMBERS=3
# the quorum members that must unmount together at the end (run-tests.sh's
# t_majority_count); 1 until the QUORUM pass runs
final_majority=1
# no udevd in the guest: dmsetup must not wait for it
export DM_DISABLE_UDEV=1

if [ -n "${NOTIFY_READER_BIN:-}" ]; then
	# run-tests.sh and the tests call mount/umount through PATH
	export NOTIFY_READER_BIN PATH=$here/wrap:$PATH
	log "scoutfs-notifyd from $NOTIFY_READER_BIN attaches to every scoutfs mount"
fi

# run_tests NR_MOUNTS NR_QUORUM RESULTS TEST...: one run-tests.sh pass, summary in RESULTS/summary.tsv
run_tests() {
	local nr=$1 quorum=$2 res=$3 t rc=0
	shift 3
	local includes=()
	for t in "$@"; do
		includes+=(-I "^$t.sh\$")
	done
	mkdir -p "$res"
	(cd "$tree/tests" && ./run-tests.sh -M /dev/vda -D /dev/vdb -f /dev/vdc -e /dev/vdd \
		-m -i -s -n "$nr" -q "$quorum" -o quorum_heartbeat_timeout_ms=60000 -r "$res" \
		"${includes[@]}") 2>&1 | tee "$res/stdout.txt" || rc=$?
	sed -n -E 's/^  ([a-z0-9_-]+) .*(passed|failed|skipped).*/\1\t\2/p' "$res/stdout.txt" \
		>"$res/summary.tsv"
	return "$rc"
}

# quorum_unmount_all MAJORITY: run-tests.sh's final unmount_all, made
# sequential by prepare-upstream-tests, would wait for ever with more than
# one quorum member: the server answers a quorum member's farewell only
# while more than a majority of the members stay mounted, or once every
# member still mounted has asked (kmod/src/server.c farewell_worker).  So
# the last MAJORITY members (test.0 up) unmount together, after the others
# one at a time.  The host's tree is read-only here: the changed copy is
# bind-mounted over run-tests.sh for the pass that needs it.
quorum_unmount_all() {
	local rt=$tree/tests/run-tests.sh copy=/tmp/run-tests-quorum.sh
	sed '/^unmount_all() {$/,/^}$/s|^\([[:space:]]*\)cmd umount "\$m"$|\1case "$m" in /mnt/test.[0-'"$(($1 - 1))"']) cmd umount "$m" \& pids="$pids $!" ;; *) cmd umount "$m" ;; esac|' \
		"$rt" >"$copy"
	grep -q 'case "$m" in /mnt/test' "$copy" ||
		die "cannot make run-tests.sh's unmount_all unmount the final quorum majority together"
	chmod +x "$copy"
	/usr/bin/mount --bind "$copy" "$rt"
}

narrow=()
wide=()
quorum=()
for t in "$@"; do
	case " $WIDE " in
	*" $t "*) wide+=("$t") && continue ;;
	esac
	case " $QUORUM " in
	*" $t "*) quorum+=("$t") ;;
	*) narrow+=("$t") ;;
	esac
done
mkdir -p "$results"
rc=0
: >"$results/summary.tsv"
if [ ${#narrow[@]} -gt 0 ]; then
	run_tests 3 1 "$results" "${narrow[@]}" || rc=$?
fi
if [ ${#wide[@]} -gt 0 ]; then
	# the first pass's mounts are gone: run-tests.sh unmounts them when it ends
	run_tests "$WIDE_MOUNTS" 1 "$results/wide" "${wide[@]}" || rc=$?
	cat "$results/wide/summary.tsv" >>"$results/summary.tsv"
fi
if [ ${#quorum[@]} -gt 0 ]; then
	# run-tests.sh's t_majority_count
	final_majority=$((QUORUM_MEMBERS / 2 + 1))
	quorum_unmount_all "$final_majority"
	run_tests "$QUORUM_MOUNTS" "$QUORUM_MEMBERS" "$results/quorum" "${quorum[@]}" || rc=$?
	/usr/bin/umount "$tree/tests/run-tests.sh"
	cat "$results/quorum/summary.tsv" >>"$results/summary.tsv"
fi
log "run-tests.sh exited $rc; summary:"
cat "$results/summary.tsv"
if [ -s "$results/fail.log" ]; then
	log "fail.log:"
	cat "$results/fail.log"
fi

# leftover mounts (run-tests.sh keeps them after a failure) must unmount
# cleanly: clients first, one at a time (prepare-upstream-tests says why),
# the final quorum majority last and together (quorum_unmount_all says why)
pids=()
for m in $(findmnt -n -t scoutfs -o TARGET | sort -r); do
	case "$m" in
	/mnt/test.[0-$((final_majority - 1))]) umount "$m" & pids+=($!) ;;
	*) umount "$m" ;;
	esac
done
for p in "${pids[@]}"; do
	wait "$p"
done
if [ -n "${NOTIFY_READER_BIN:-}" ]; then
	"$here/wrap/readers" check
fi
check_dmesg
exit "$rc"
