#!/bin/sh
# Make the base image the Dockerfile starts FROM, debian:bookworm-slim, with
# debootstrap, when podman does not have it yet.  A machine that can reach
# Docker Hub does not need this; the build machines cannot reach any
# registry, so they bootstrap a minimal Debian 12 from the Debian archive.
#
#   sh etc/docker/base-image.sh [IMAGE]     (default debian:bookworm-slim)
set -eu

image=${1:-debian:bookworm-slim}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if podman image exists "$image"; then
    echo "base-image: $image is present"
    exit 0
fi

command -v debootstrap >/dev/null 2>&1 || {
    echo "base-image: debootstrap is not installed; run make deps" >&2
    exit 1
}

root=$(mktemp -d "${TMPDIR:-/tmp}/quayfront-base.XXXXXX")
trap 'rm -rf "$root"' EXIT INT TERM
echo "base-image: debootstrap --variant=minbase bookworm (about half a minute)"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -n 30 "$root.log" >&2
    rm -f "$root.log"
    exit 1
}
rm -f "$root.log"
# What the official slim image also drops: package lists and caches.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | podman import --change 'CMD ["bash"]' - "$image"
echo "base-image: imported $image"
