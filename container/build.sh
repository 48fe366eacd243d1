#!/bin/sh
# Build the netboot image where no container registry and no package index are reachable from
# the build:
#   1. a Debian 12 base with python3 and ipxe, made by mmdebstrap from the Debian mirror and
#      imported into podman (once: reused while the package list is the same);
#   2. netboot and its dependencies, with the postgresql extra's (asyncpg) and the fast
#      extra's (uvloop), as wheels
#      (pip wheel '.[postgresql,fast]' -w wheelhouse);
#   3. podman build of the Containerfile from those wheels, with no network.
#
#   container/build.sh [TAG]        default TAG: localhost/netboot
#
# PYTHON  interpreter whose pip builds the wheels (default python3, with Debian's python3-pip;
#         or a venv's python). The image runs Debian 12's Python 3.11, so the wheels must be
#         built by a Python 3.11, as Debian 12's python3 is.
# WHEELHOUSE  a directory of wheels already built (netboot and its dependencies, asyncpg
#             included): skips step 2.
set -eu

tag="${1:-localhost/netboot}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"

# 1. The base. merged-usr hook: bookworm would otherwise pull usrmerge and, with it, perl.
#    Documentation is left out: nobody reads man pages in this image.
packages="python3 python3-venv ipxe"
base="localhost/netboot-base:bookworm-$(echo "$packages" | sha256sum | cut -c1-12)"
if ! podman image exists "$base"; then
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    # Its chatter goes to a log, shown only when it fails.
    mmdebstrap --quiet --variant=minbase --include="$(echo "$packages" | tr ' ' ,)" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        bookworm "$rootfs/rootfs.tar" >"$rootfs/log" 2>&1 || { cat "$rootfs/log" >&2; exit 1; }
    podman import --quiet "$rootfs/rootfs.tar" "$base" >/dev/null
fi

# 2. The wheels, in a build context that holds nothing else.
context="$(mktemp -d)"
trap 'rm -rf "$context" ${rootfs:+"$rootfs"}' EXIT
if [ -n "${WHEELHOUSE:-}" ]; then
    cp -r "$WHEELHOUSE" "$context/wheelhouse"
else
    "$python" -m pip wheel --quiet --wheel-dir "$context/wheelhouse" "$root[postgresql,fast]"
fi

# 3. The image. --network=none: the build must not need one, and no bridge is set up for it.
podman build --quiet --network=none --build-arg BASE="$base" -t "$tag" \
    -f "$root/Containerfile" "$context" >/dev/null
echo "$tag"
