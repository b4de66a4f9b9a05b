#!/bin/sh
# Install the system packages quayfront's tests and dev setup need, on
# Debian 12 (bookworm). Does nothing (and touches no package list) when
# every package is already installed, so it is cheap to call from make.
#
#   haproxy          the load balancer in front of quayfront (PROXY v1/v2)
#   docker-registry  the upstream registry (Docker Distribution 2.8)
#   skopeo           pushes and pulls images in the integration tests
#   curl, openssl    test clients, dev certificates
#   testssl.sh       TLS scan in the integration tests (`testssl`)
#   nginx            baseline for the benchmarks
#   procps           ps/pgrep for debugging the test processes
#   logrotate        runs the shipped etc/logrotate.d/quayfront in the tests
#   debhelper, dh-virtualenv, dpkg-dev, build-essential, python3-venv
#                    make deb: the package's venv against Debian's python3
#   lintian          make deb checks the package; the packaging tests too
#   git              make deb builds from a clean copy of the checkout
#   systemd          systemd-analyze (verify, security) and
#                    systemd-socket-activate in the packaging tests
#   podman, runc, debootstrap
#                    make image: build and run the container image; the
#                    base image is bootstrapped (no registry is reachable)
#   redis-server     the shared rate-limit store in the scale-out integration tests
#   wrk              the benchmarks' load generator (make bench): a C client
#                    with TLS and keep-alive, so the client costs a fraction of
#                    what a Python one would and the front is what saturates
#
# Needs root, or sudo rights for apt-get. Set SUDO= explicitly to override.
set -eu

PACKAGES="haproxy docker-registry skopeo curl openssl testssl.sh nginx procps logrotate"
PACKAGES="$PACKAGES debhelper dh-virtualenv dpkg-dev build-essential python3-venv lintian git"
PACKAGES="$PACKAGES systemd podman runc debootstrap"
PACKAGES="$PACKAGES redis-server"
PACKAGES="$PACKAGES wrk"

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "installed" ]; then
        missing="$missing $pkg"
    fi
done

if [ -z "$missing" ]; then
    echo "install-system-deps: all present ($PACKAGES)"
    exit 0
fi

echo "install-system-deps: missing:$missing"

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: apt-get not found; this script supports Debian 12 only." >&2
    echo "install-system-deps: install these packages by hand:$missing" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=${SUDO-}
elif command -v sudo >/dev/null 2>&1; then
    SUDO=${SUDO-sudo}
    echo "install-system-deps: not root; using sudo to run apt-get (needs sudo rights for apt-get)."
else
    echo "install-system-deps: not root and sudo is not installed." >&2
    echo "install-system-deps: as root, run: apt-get update && apt-get install -y$missing" >&2
    exit 1
fi

# Non-interactive: CI has no stdin and no terminal.
export DEBIAN_FRONTEND=noninteractive
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
# shellcheck disable=SC2086  # word splitting of the package list is intended
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
echo "install-system-deps: installed:$missing"
