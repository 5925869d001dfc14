#!/bin/bash
# The shipped units under the real systemd, as PID 1 of the guest
# (run-guest --systemd): scoutfs-notifyd@, scoutfs-notify-forward@ (to the
# venv's nats-server on loopback) and scoutfs-notify-shim@ for a tmpfs mount
# that the fanotify source serves, so no scoutfs build is needed.
#
#   systemd.sh VENV_BIN REPO
#
# Each check prints "guest: ok CHECK" or ends the run with "guest: FAIL ...".
# The units are the repository's files unchanged; the one drop-in gives the
# daemon --source fanotify (the unit's ExecStart has the scoutfs source).
set -Eeuo pipefail
bin=$1
repo=$2
trap 'die "line $LINENO: $BASH_COMMAND failed"' ERR

log() { echo "guest: $*"; }
die() {
	echo "guest: FAIL: $*"
	systemctl status --no-pager 'scoutfs-notify*' || true
	journalctl -b --no-pager -n 60 -o short-monotonic || true
	exit 1
}
ok() { log "ok $*"; }

# Bounds on waiting for systemd, not timings: python under tcg is slow.
WAIT=120

wait_until() { # wait_until WHAT COMMAND...
	local what=$1 end=$((SECONDS + WAIT))
	shift
	while ((SECONDS < end)); do
		"$@" && return 0
		sleep 0.2
	done
	die "timed out waiting for $what"
}

[ "$(cat /proc/1/comm)" = systemd ] || die "PID 1 is $(cat /proc/1/comm), not systemd"
ok "systemd is PID 1 ($(systemctl --version | head -n 1))"
modprobe fuse

# the units' ExecStart paths, as `pip install .` would make them
for s in scoutfs-notifyd scoutfs-notify scoutfs-notify-shim scoutfs-notify-forward; do
	ln -sf "$bin/$s" "/usr/local/bin/$s"
done
cp "$repo"/systemd/scoutfs-notifyd@.service "$repo"/systemd/scoutfs-notify-shim@.service \
	"$repo"/systemd/scoutfs-notify-forward@.service /etc/systemd/system/
mnt=/mnt/data
inst=$(systemd-escape -p "$mnt")
daemon=scoutfs-notifyd@$inst.service
shim=scoutfs-notify-shim@$inst.service
forward=scoutfs-notify-forward@$inst.service
# the mount the units wait for: a tmpfs that only systemd mounts, on demand
cat >/run/systemd/system/mnt-data.mount <<EOF
[Mount]
What=tmpfs
Where=$mnt
Type=tmpfs
Options=mode=0755
EOF
mkdir -p "/etc/systemd/system/$daemon.d"
cat >"/etc/systemd/system/$daemon.d/fanotify.conf" <<EOF
[Service]
ExecStart=
ExecStart=/usr/local/bin/scoutfs-notifyd --source fanotify %f
EOF
systemctl daemon-reload
# the fanotify source's socket (the directory does not exist until mounted)
sock=$("$bin/python" -c 'import sys; from notifyd.paths import socket_path_for_dir as p; print(p(sys.argv[1]))' "$mnt")

# --- the daemon ---------------------------------------------------------------

! mountpoint -q "$mnt" || die "$mnt is mounted before the daemon starts"
systemctl show -p RequiresMountsFor --value "$daemon" | grep -qw "$mnt" ||
	die "$daemon has no RequiresMountsFor=$mnt"
# Type=notify: watch the unit come up without waiting for it; it must never be
# active before its socket accepts (the daemon sends READY=1 once it listens)
accepts() {
	"$bin/python" - "$1" <<-'EOF' 2>/dev/null
		import socket, sys
		s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
		s.connect(sys.argv[1])
	EOF
}
# watch_start UNIT CHECK...: start UNIT, and fail if it is ever active while CHECK fails
watch_start() {
	local unit=$1 state seen="" end=$((SECONDS + WAIT))
	shift
	systemctl start --no-block "$unit"
	while ((SECONDS < end)); do
		state=$(systemctl is-active "$unit" || true)
		case "$state" in
		active)
			"$@" || die "$unit is active but $* fails: active before READY=1"
			log "states of $unit before active: ${seen:-none seen}"
			return 0
			;;
		failed) die "$unit failed to start" ;;
		*) [[ " $seen " == *" $state "* ]] || seen="$seen $state" ;;
		esac
		sleep 0.2
	done
	die "$unit not active after ${WAIT}s"
}
[ "$(systemctl show -p Type --value "$daemon")" = notify ] || die "$daemon is not Type=notify"
watch_start "$daemon" accepts "$sock"
mountpoint -q "$mnt" || die "$mnt was not mounted for $daemon"
mounted=$(systemctl show -p ActiveEnterTimestampMonotonic --value mnt-data.mount)
started=$(systemctl show -p ExecMainStartTimestampMonotonic --value "$daemon")
((mounted > 0 && mounted <= started)) || die "the daemon started ($started) before its mount ($mounted)"
ok "RequiresMountsFor: starting $daemon mounted $mnt first (mount at ${mounted}us, daemon at ${started}us)"
ok "READY=1: $daemon was never active before $sock accepted"
ok "journal: $(journalctl -b --no-pager -o cat -u "$daemon" | grep -m 1 'ready: ')"

mode() { stat -c '%a %U' "$1"; }
[ "$(mode "$sock")" = "600 root" ] || die "socket $sock is $(mode "$sock")"
[ "$(mode "$(dirname "$sock")")" = "700 root" ] || die "$(dirname "$sock") is $(mode "$(dirname "$sock")")"
[ "$(mode /run/scoutfs)" = "700 root" ] || die "/run/scoutfs is $(mode /run/scoutfs)"
ok "socket modes: $sock 600, its directory 700, /run/scoutfs 700, all root's"

# kill -9: no cleanup, a stale socket; Restart=on-failure brings it back
pid=$(systemctl show -p MainPID --value "$daemon")
kill -9 "$pid"
restarted() {
	local now
	now=$(systemctl show -p MainPID --value "$daemon")
	[ "$now" != 0 ] && [ "$now" != "$pid" ] && [ "$(systemctl is-active "$daemon")" = active ]
}
wait_until "$daemon to restart after kill -9" restarted
[ "$(systemctl show -p NRestarts --value "$daemon")" = 1 ] || die "NRestarts is not 1"
"$bin/scoutfs-notify" stats --socket "$sock" >/dev/null || die "the restarted daemon does not answer"
ok "kill -9 of pid $pid: restarted as pid $(systemctl show -p MainPID --value "$daemon"), serving $sock again"

# --- the forwarder ------------------------------------------------------------

# a JetStream server on loopback, its store on the guest's tmpfs: the stream
# must fit it, hence --max-bytes in the unit's environment file
mkdir -p /var/tmp/nats /etc/scoutfs-notify
"$bin/nats-server" -js -a 127.0.0.1 -p 4222 -m 8222 -sd /var/tmp/nats >/var/tmp/nats.log 2>&1 &
wait_until "nats-server to listen" bash -c 'exec 3<>/dev/tcp/127.0.0.1/8222'
cat >"/etc/scoutfs-notify/forward-$inst.env" <<EOF
NATS_URL=nats://127.0.0.1:4222
FORWARD_ARGS=--max-bytes 64M --node guest
EOF
chmod 600 "/etc/scoutfs-notify/forward-$inst.env"
systemctl show -p RequiresMountsFor --value "$forward" | grep -qw "$mnt" ||
	die "$forward has no RequiresMountsFor=$mnt"
systemctl show -p After --value "$forward" | grep -qw "$daemon" || die "$forward is not after $daemon"
# READY=1 comes once NATS answered and the stream exists (then the daemon's
# socket is read, which the daemon may accept a moment later)
stream_made() {
	"$bin/python" -c 'import json, sys, urllib.request as u
sys.exit(json.load(u.urlopen("http://127.0.0.1:8222/jsz"))["streams"] < 1)'
}
forwarding() {
	local pid
	pid=$(systemctl show -p MainPID --value "$forward")
	"$bin/scoutfs-notify" stats --json --socket "$sock" | grep -q "\"pid\": $pid\b"
}
[ "$(systemctl show -p Type --value "$forward")" = notify ] || die "$forward is not Type=notify"
! stream_made || die "the stream exists before $forward started"
watch_start "$forward" stream_made
wait_until "the daemon to serve $forward" forwarding
ok "READY=1: $forward was never active before its stream existed; the daemon serves it"
ok "journal of the forwarder: $(journalctl -b --no-pager -o cat -u "$forward" | grep -m 1 'scoutfs.notify')"
fwd_pid=$(systemctl show -p MainPID --value "$forward")
kill -9 "$fwd_pid"
fwd_restarted() {
	local now
	now=$(systemctl show -p MainPID --value "$forward")
	[ "$now" != 0 ] && [ "$now" != "$fwd_pid" ] &&
		[ "$(systemctl is-active "$forward")" = active ] && forwarding
}
wait_until "$forward to restart after kill -9" fwd_restarted
ok "kill -9 of forwarder pid $fwd_pid: restarted, a client of the daemon again"
systemctl stop "$forward" || die "systemctl stop $forward failed"
state=$(systemctl is-active "$forward" || true)
[ "$state" = inactive ] || die "$forward is $state after systemctl stop"
ok "systemctl stop $forward: inactive, not failed"

# --- the shim -----------------------------------------------------------------

overlay=$mnt.inotify
overlay_live() {
	[ "$(findmnt -n -o FSTYPE "$overlay")" = fuse.scoutfs-notify-shim ] && ls "$overlay" >/dev/null
}
watch_start "$shim" overlay_live
ok "READY=1: $shim was never active before $overlay was mounted and answered"
# the whole path under systemd: doctor finds the daemon and the subscribed shim
shim_pid=$(systemctl show -p MainPID --value "$shim")
wait_until "the shim to subscribe" \
	bash -c "'$bin/scoutfs-notify' stats --json --socket '$sock' | grep -q '\"pid\": $shim_pid'"
"$bin/scoutfs-notify" doctor "$mnt" || die "doctor finds a problem in the healthy set-up"
ok "doctor: all is well with $daemon and $shim"

shim_pid=$(systemctl show -p MainPID --value "$shim")
kill -9 "$shim_pid"
shim_restarted() {
	local now
	now=$(systemctl show -p MainPID --value "$shim")
	[ "$now" != 0 ] && [ "$now" != "$shim_pid" ] && [ "$(systemctl is-active "$shim")" = active ]
}
wait_until "$shim to restart after kill -9" shim_restarted
[ "$(findmnt -n -o FSTYPE "$overlay")" = fuse.scoutfs-notify-shim ] || die "$overlay not mounted again"
ls "$overlay" >/dev/null || die "$overlay is dead after the restart"
ok "kill -9 of shim pid $shim_pid: restarted, the dead overlay replaced by a live one"

systemctl stop "$shim" || die "systemctl stop $shim failed"
! findmnt -n "$overlay" >/dev/null || die "systemctl stop left $overlay mounted"
ok "systemctl stop $shim unmounted $overlay"

systemctl stop "$daemon" || die "systemctl stop $daemon failed"
[ ! -e "$sock" ] || die "systemctl stop left $sock behind"
journalctl -b --no-pager -o cat -u "$daemon" | grep -q "SIGTERM: shutting down" ||
	die "the journal has no shutdown line of $daemon"
ok "systemctl stop $daemon removed $sock (journal: SIGTERM: shutting down)"
log "systemd ok"
