#!/bin/sh
# Build the container image from the Dockerfile and the .deb in dist/ into
# podman's default storage as localhost/quayfront:<version> and :latest.
#
#   sh etc/docker/build-image.sh      (make image, after make deb)
#
# Podman settings come from etc/docker/containers.conf (runc, ulimits within
# the hard limits); the base image is bootstrapped when absent
# (etc/docker/base-image.sh); builds use the host network.
set -eu

cd "$(dirname "$0")/../.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/etc/docker/containers.conf}"
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' quayfront/__init__.py)
deb="dist/quayfront_${version}_$(dpkg --print-architecture).deb"
[ -f "$deb" ] || { echo "build-image: $deb is missing; run make deb" >&2; exit 1; }
# Only this version's package goes into the image.
stale=$(ls dist/quayfront_*.deb | grep -vxF "$deb" || true)
[ -z "$stale" ] || { echo "build-image: remove the other packages in dist/: $stale" >&2; exit 1; }

command -v podman >/dev/null 2>&1 || { echo "build-image: podman is not installed; run make deps" >&2; exit 1; }
sh etc/docker/base-image.sh debian:bookworm-slim

previous=$(podman image inspect --format '{{.Id}}' "localhost/quayfront:$version" 2>/dev/null || true)
start=$(date +%s)
# --format docker keeps HEALTHCHECK (the OCI image format has no field for
# it); --pull=never uses the local base image.
podman build --format docker --network=host --pull=never \
    -t "localhost/quayfront:$version" -t localhost/quayfront:latest -f Dockerfile .
echo "build-image: localhost/quayfront:$version and :latest ($(( $(date +%s) - start )) s)"
# The image these tags named before, unless a container still uses it.
current=$(podman image inspect --format '{{.Id}}' "localhost/quayfront:$version")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
fi
