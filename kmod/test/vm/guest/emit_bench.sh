#!/bin/bash
# The emit cost on the real kernel (bench/kmod_emit.py): one read-heavy
# workload timed on one filesystem three ways, rounds interleaved:
# the unpatched module, the patched one with no reader, and the patched one
# with scoutfs-notifyd attached and draining (NODELAY=1: a fourth way, the
# daemon with --drain-delay 0, as it drained before that option; DIAG=1: an
# attached reader that never drains and a C reader that drains without
# relaying, see diag()).
#
#   emit_bench.sh VENV_BIN WORKLOAD OUTDIR REPEATS ROUNDS CHUNK FILES
#
# SCOUTFS_BUILD is the unpatched build (its utils make the filesystem),
# PATCHED_BUILD the patched one.  OUTDIR/emit.tsv gets one line per run:
# "variant<TAB>seconds<TAB>opens<TAB>reads<TAB>emitted<TAB>dropped" (the last
# two: the mount's notify counters moved by that run); OUTDIR/daemon.tsv one
# per run with the daemon: "variant<TAB>CPU ticks during the run<TAB>records
# drained<TAB>drains<TAB>ticks a second" (drained and drains over its life).
# Disks: /dev/vda (meta), /dev/vdb (data).  With two vCPUs or more the
# workload runs on CPU 0 and the daemon on CPU 1, as a daemon on a core of
# its own would; with one they share it.
here=$(dirname "$(readlink -f "$0")")
. "$here/lib.sh"
bin=$1
workload=$2
out=$3
repeats=$4
rounds=$5
chunk=$6
nfiles=$7
: "${PATCHED_BUILD:?PATCHED_BUILD (the patched build-scoutfs OUTDIR) is not set}"
unpatched=$SCOUTFS_BUILD
mkdir -p "$out"
tsv=$out/emit.tsv
: >"$tsv"
: >"$out/daemon.tsv"
mnt=/mnt/bench
on_workload_cpu=()
on_daemon_cpu=()
if [ "$(nproc)" -ge 2 ]; then
	on_workload_cpu=(taskset -c 0)
	on_daemon_cpu=(taskset -c 1)
fi
list=/tmp/files

modprobe -a virtio_blk libcrc32c loop dm_mod
mkfs_single /dev/vda /dev/vdb

up() { # BUILD
	insmod "$1/scoutfs.ko"
	mount_scoutfs /dev/vda /dev/vdb "$mnt" 0
}

down() {
	umount "$mnt"
	rmmod scoutfs
}

counter() { # NAME: the mount's notify counter, 0 on the unpatched module
	local d
	d=$(sysfs_dir_of "$mnt")
	cat "$d/counters/$1" 2>/dev/null || echo 0
}

# one timed run; the page cache is warm from the run before it
run() { # VARIANT
	local e0 d0 r
	e0=$(counter notify_emitted)
	d0=$(counter notify_dropped_ring_full)
	r=$("${on_workload_cpu[@]}" "$workload" "$rounds" "$chunk" <"$list") || die "workload failed"
	printf '%s\t%s\t%s\t%s\n' "$1" "$(echo "$r" | tr ' ' '\t')" \
		"$(($(counter notify_emitted) - e0))" \
		"$(($(counter notify_dropped_ring_full) - d0))" >>"$tsv"
}

warm() {
	"$workload" 1 "$chunk" <"$list" >/dev/null || die "workload failed"
}

up "$unpatched"
mkdir -p "$mnt/files"
for i in $(seq "$nfiles"); do
	head -c 16384 /dev/urandom >"$mnt/files/f$i"
done
ls -d "$mnt"/files/* >"$list"
sync
down
# the clock every record's time_ns is read from (run-guest --append)
cat /sys/devices/system/clocksource/clocksource0/current_clocksource >"$out/clocksource"
log "filesystem with $nfiles files of 16 KiB; $repeats repeats of $rounds rounds, $chunk-byte reads; $(nproc) vCPU; clocksource $(cat "$out/clocksource")"

sock=/run/emit-bench/notify.sock
mkdir -p /run/emit-bench
cpu_ticks() { # PID: its user + system CPU in clock ticks
	awk '{ print $14 + $15 }' "/proc/$1/stat"
}

with_daemon() { # [VARIANT DAEMON-ARGS...]
	local variant=${1:-patched-daemon}
	shift $(($# ? 1 : 0))
	"${on_daemon_cpu[@]}" "$bin/scoutfs-notifyd" "$mnt" --socket "$sock" --log-level warning \
		"$@" >>"$out/daemon.log" 2>&1 &
	local pid=$!
	local n=0
	until [ -S "$sock.stats" ]; do
		sleep 0.2
		n=$((n + 1))
		[ "$n" -lt 600 ] || die "daemon did not start: see daemon.log"
	done
	local c0 st
	c0=$(cpu_ticks "$pid")
	run "$variant"
	# what the daemon cost during the run: its CPU and how many drains it made
	st=$("$bin/scoutfs-notify" stats --socket "$sock" --json) || die "no daemon stats"
	printf '%s\t%s\t%s\t%s\n' "$variant" "$(($(cpu_ticks "$pid") - c0))" \
		"$(echo "$st" | "$bin/python" -c 'import json, sys; d = json.load(sys.stdin); print(d["records"], d["drains"], sep="\t")')" \
		"$(getconf CLK_TCK)" >>"$out/daemon.tsv"
	kill -TERM "$pid"
	wait "$pid" || die "daemon exited non-zero"
}

# NODELAY=1 adds a fourth variant, the daemon with --drain-delay 0 (every
# drain right after the last), to compare with the default in the same guest
nodelay() {
	[ "${NODELAY:-0}" = 1 ] || return 0
	with_daemon patched-daemon-nodelay --drain-delay 0
}

# DIAG=1: the kernel's part alone.  A reader attaches and never drains: after
# the first 1024 records every emit is a drop, which reads the clock, takes the
# ring's lock and counts as a stored record does, with no daemon using a CPU;
# once with the guest's clocksource and once with the emulated HPET.
idle_reader() { # VARIANT
	"$bin/python" -c 'import sys, time
from notifyd.source_scoutfs import ScoutfsSource
ScoutfsSource(sys.argv[1]).open()
print("attached", flush=True)
time.sleep(86400)' "$mnt" >"$out/idle-reader.out" 2>&1 &
	local pid=$! n=0
	until grep -q attached "$out/idle-reader.out"; do
		sleep 0.2
		n=$((n + 1))
		[ "$n" -lt 600 ] || die "the idle reader did not attach: $(cat "$out/idle-reader.out")"
	done
	run "$1"
	kill -KILL "$pid"
	wait "$pid" 2>/dev/null || true
}

# DIAG=1, too: a reader that drains as the daemon does (drain-delay 1 ms) but
# does nothing with the records ($DRAINER, bench/emit_drainer.c), on the
# daemon's vCPU: the kernel's whole part of a drained ring with almost none of
# the daemon's CPU.  daemon.tsv gets its CPU, records and drains as a daemon's.
c_drainer() {
	"${on_daemon_cpu[@]}" "$DRAINER" "$mnt" 1000 >"$out/drainer.out" 2>&1 &
	local pid=$! n=0 c0
	until grep -q attached "$out/drainer.out"; do
		sleep 0.2
		n=$((n + 1))
		[ "$n" -lt 600 ] || die "the drainer did not attach: $(cat "$out/drainer.out")"
	done
	c0=$(cpu_ticks "$pid")
	run patched-c-drainer
	local ticks
	ticks=$(($(cpu_ticks "$pid") - c0))
	kill -TERM "$pid"
	wait "$pid" || die "the drainer failed: $(cat "$out/drainer.out")"
	# its line: records drains waits dropped
	printf '%s\t%s\t%s\t%s\n' patched-c-drainer "$ticks" \
		"$(tail -n 1 "$out/drainer.out" | awk '{ print $1 "\t" $2 }')" \
		"$(getconf CLK_TCK)" >>"$out/daemon.tsv"
}

diag() {
	[ "${DIAG:-0}" = 1 ] || return 0
	local cs=/sys/devices/system/clocksource/clocksource0/current_clocksource
	local was
	was=$(cat "$cs")
	idle_reader patched-idle-reader
	echo hpet >"$cs"
	idle_reader patched-idle-reader-hpet
	echo "$was" >"$cs"
	c_drainer
}

for i in $(seq "$repeats"); do
	# the order alternates so that drift over the run hits every variant alike
	if [ $((i % 2)) = 1 ]; then
		up "$unpatched" && warm && run unpatched && down
		up "$PATCHED_BUILD" && warm && run patched-no-reader && with_daemon && nodelay && diag && down
	else
		up "$PATCHED_BUILD" && warm && diag && nodelay && with_daemon && run patched-no-reader && down
		up "$unpatched" && warm && run unpatched && down
	fi
	log "repeat $i done"
done
check_dmesg
cat "$tsv"
log "emit bench ok"
