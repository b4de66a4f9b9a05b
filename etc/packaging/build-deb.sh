#!/bin/sh
# Build dist/quayfront_<version>_<arch>.deb (Debian 12, dh-virtualenv) from
# a clean copy of the checkout: tracked and new files, never what
# .gitignore excludes (.venv, caches, dist/), so nothing of a developer's
# environment leaks into the package.  Then lintian it: errors fail the
# build.
#
#   sh etc/packaging/build-deb.sh          (make deb)
set -eu

cd "$(dirname "$0")/../.."
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' quayfront/__init__.py)
changelog_version=$(dpkg-parsechangelog -S Version)
if [ "$version" != "$changelog_version" ]; then
    echo "build-deb: quayfront/__init__.py says $version but debian/changelog says $changelog_version;" \
        "add a debian/changelog entry for $version" >&2
    exit 1
fi
arch=$(dpkg --print-architecture)
deb="quayfront_${version}_${arch}.deb"

work=$(mktemp -d "${TMPDIR:-/tmp}/quayfront-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
src="$work/quayfront-$version"
mkdir -p "$src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Files deleted in the working tree but not yet in the index are skipped.
    git ls-files -z --cached --others --exclude-standard \
        | xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done; true' files \
        | tar --null -T - -cf - | tar -C "$src" -xf -
else
    tar --exclude=./.venv --exclude=./dist --exclude=./build --exclude=./run \
        --exclude=__pycache__ --exclude='*.egg-info' --exclude=./.git \
        --exclude=.pytest_cache --exclude=.hypothesis -cf - . | tar -C "$src" -xf -
fi

echo "build-deb: building $deb in $work"
start=$(date +%s)
(cd "$src" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1 || {
    tail -n 60 "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed" >&2
    exit 1
}
mkdir -p dist
cp "$work/$deb" "dist/$deb"
echo "build-deb: dist/$deb ($(du -h "dist/$deb" | cut -f1), $(( $(date +%s) - start )) s)"

# Errors fail; warnings are shown.  Overrides: debian/quayfront.lintian-overrides.
# LINTIAN=no skips it (the packaging tests run lintian themselves).
if [ "${LINTIAN:-yes}" = no ]; then
    exit 0
fi
lintian --fail-on error "dist/$deb" || {
    echo "build-deb: lintian reports errors on dist/$deb" >&2
    exit 1
}
echo "build-deb: lintian: no errors"
