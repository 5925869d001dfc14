#!/bin/bash
#
# Apply the notify patch series to a scoutfs checkout of a supported
# release:
#
#	kmod/apply.sh SCOUTFS_CHECKOUT
#
# The checkout must be clean and exactly at a release tag listed in
# kmod/base.txt.  The series for that tag is applied with git am --3way,
# which commits each patch on the checked out branch (or detached HEAD).
#

set -euo pipefail

die() {
	echo "apply.sh: $*" >&2
	exit 1
}

[ $# -eq 1 ] || { echo "usage: kmod/apply.sh SCOUTFS_CHECKOUT" >&2; exit 2; }

KMOD=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CO=$1

git -C "$CO" rev-parse --git-dir >/dev/null 2>&1 ||
	die "$CO is not a git checkout: clone scoutfs (kmod/fetch-scoutfs) and check out a release tag"
[ -d "$CO/kmod/src" ] || die "$CO is not a scoutfs checkout (no kmod/src)"

if ! TAG=$(git -C "$CO" describe --tags --exact-match HEAD 2>/dev/null); then
	where=$(git -C "$CO" describe --tags 2>/dev/null || git -C "$CO" rev-parse --short HEAD)
	die "$CO is at $where, not at a release tag: git -C $CO checkout <tag> (supported: $(awk '!/^#/ && NF {printf "%s ", $1}' "$KMOD/base.txt"))"
fi

if ! awk -v tag="$TAG" '!/^#/ && $1 == tag { found = 1 } END { exit !found }' "$KMOD/base.txt" ||
   [ ! -d "$KMOD/series/$TAG" ]; then
	die "no series for scoutfs $TAG (supported: $(awk '!/^#/ && NF {printf "%s ", $1}' "$KMOD/base.txt")): see 'Rebasing onto a new release' in kmod/README.md"
fi

if [ -n "$(git -C "$CO" status --porcelain --untracked-files=no)" ]; then
	die "$CO has uncommitted changes: commit or stash them first"
fi

git -C "$CO" var GIT_COMMITTER_IDENT >/dev/null 2>&1 ||
	die "git am needs a committer identity: git config --global user.name NAME; git config --global user.email EMAIL"

shopt -s nullglob
PATCHES=("$KMOD/series/$TAG"/*.patch)
[ ${#PATCHES[@]} -gt 0 ] || die "kmod/series/$TAG has no patches: run kmod/gen-series $TAG"

if ! git -C "$CO" am --3way --quiet "${PATCHES[@]}"; then
	git -C "$CO" am --abort 2>/dev/null || true
	die "the $TAG series doesn't apply to $CO, left unchanged"
fi

echo "apply.sh: applied ${#PATCHES[@]} patches for scoutfs $TAG to $CO"
