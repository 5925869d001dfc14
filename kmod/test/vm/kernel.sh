# Sourced by the VM scripts: which kernel the guest boots, and whether this
# host can boot it.

# The guest kernel must be the one the Debian 6.1 headers belong to: a
# 6.12 kernel (also installable on Debian 12) rejects every 6.1-built module,
# so pin the release of the installed linux-headers-6.1.*-amd64, never "the newest".
vm_kernel_release() {
	local hdr
	hdr=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' 'linux-headers-6.1.*-amd64' 2>/dev/null |
		awk '$1 == "ii" { sub(/^linux-headers-/, "", $2); print $2 }' | sort -V | tail -n 1)
	echo "$hdr"
}

# Print why this host cannot boot kernel $1 under qemu, or nothing.
vm_missing() {
	local kver=$1
	if [ -z "$kver" ]; then
		echo "no linux-headers-6.1.*-amd64 installed: apt-get install linux-headers-amd64 (Debian 12)"
		return
	fi
	command -v qemu-system-x86_64 >/dev/null ||
		{ echo "no qemu-system-x86_64: apt-get install qemu-system-x86" && return; }
	[ -r "/boot/vmlinuz-$kver" ] ||
		{ echo "no /boot/vmlinuz-$kver: apt-get install linux-image-$kver" && return; }
	[ -f "/lib/modules/$kver/modules.dep" ] ||
		{ echo "no /lib/modules/$kver: apt-get install linux-image-$kver" && return; }
	[ -x /bin/busybox ] ||
		{ echo "no /bin/busybox: apt-get install busybox-static" && return; }
	command -v cpio >/dev/null || { echo "no cpio: apt-get install cpio" && return; }
	[ "$(id -u)" = 0 ] || { echo "the guest shares the host root: run as root" && return; }
}

vm_check_host() {
	local why
	why=$(vm_missing "$1")
	if [ -n "$why" ]; then
		echo "vm: cannot boot the test kernel: $why" >&2
		exit 3
	fi
}
