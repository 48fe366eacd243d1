#!/bin/sh
# Install what the whole test suite needs on Debian 12 (bookworm), as root. Idempotent.
#
#   tests/install-deps.sh            packages + arm64 dpkg architecture + .venv with
#                                    `pip install -e '.[test]'` (what .ci/run expects)
#   NO_PIP=1 tests/install-deps.sh   packages only
#
# The arm64 kernel and busybox-static:arm64 are not installed: the e2e harness fetches them
# with `apt-get download` (netboot/lab/artifacts.py), which needs the arm64 architecture
# and its package lists, hence --add-architecture + apt-get update here.
set -eu

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

updated=""
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
fi
# Update once; again only when the arm64 lists are missing (architecture just added).
# Looked for as files: `apt-cache show linux-image-arm64:arm64` parsed every list (no
# pkgcache.bin kept here), 5-10 s on a loaded 2-core machine at every run.
eval "$(apt-config shell LISTS Dir::State::Lists/d)"
if ! ls "${LISTS:-/var/lib/apt/lists/}" 2>/dev/null | grep -q '_binary-arm64_Packages'; then
    apt-get update -q
    updated=1
fi

# qemu + firmware: the guests; dnsmasq-base: the site DHCP server (not the `dnsmasq` package,
# which would enable a system DNS service on :53); busybox-static/cpio/kmod: initramfs build;
# tftp-hpa, atftp, bind9-dnsutils, isc-dhcp-client, udhcpc: clients used by the server tests;
# tcpdump captures the lab bridge, tshark (optional) decodes it on failure;
# podman, runc and mmdebstrap build and run the container image (tests/test_container.py):
# runc, not crun, because crun fails on hosts with a hybrid cgroup layout; chromium is the
# headless browser Playwright drives in the dashboard tests (tests/web/).
# shim-signed + grub-efi-amd64-signed: the Secure Boot chain (shim → signed GRUB); the arm64
# signed GRUB is fetched by the harness like the arm64 kernel (its grub-common:arm64 cannot
# be installed beside the amd64 one); qemu-efi-aarch64: AAVMF, arm64 UEFI.
# curl, openssl, util-linux (unshare): tools tests run (their requires marks), named here
# rather than left to other packages' dependencies.
# wrk: the HTTP load generator of benchmarks/http_paths.py, whose Lua script a test runs.
# strace: its fault injection kills a real netboot process at one system call (a kill -9
# at a chosen moment: tests/test_sealing.py, tests/inventory/test_transfer.py).
# postgresql: its initdb/postgres binaries; the tests make a throwaway cluster of their own
# (netboot/lab/pgcluster.py, through tests/pg.py) and never use the one the package may start.
# pgbouncer: the PostgreSQL store through it (tests/pg.py's bouncing, which runs its own on a
# Unix socket; the package's own service, if the host starts it, is never used).
# make pkg-config dpkg-dev libevent-dev libc-ares-dev libssl-dev: building the newer
# pgbouncer below.
PKGS="qemu-system-x86 qemu-system-arm ipxe-qemu ipxe ovmf u-boot-qemu u-boot-tools \
shim-signed grub-efi-amd64-signed qemu-efi-aarch64 \
dnsmasq-base busybox-static cpio kmod iproute2 tcpdump tftp-hpa atftp bind9-dnsutils \
isc-dhcp-client udhcpc python3 python3-pip python3-venv python3-dev gcc ca-certificates \
podman runc mmdebstrap chromium postgresql pgbouncer wrk strace curl openssl util-linux \
make pkg-config dpkg-dev libevent-dev libc-ares-dev libssl-dev"

# One dpkg-query for all (one a package took ~2.5 s of processes under load).
# shellcheck disable=SC2086
installed=" $(dpkg-query -W -f='${Package} ${Status}\n' $PKGS 2>/dev/null \
    | sed -n 's/ install ok installed$//p' | tr '\n' ' ') "
missing=""
for p in $PKGS; do
    case "$installed" in *" $p "*) ;; *) missing="$missing $p" ;; esac
done
if [ -n "$missing" ]; then
    [ -n "$updated" ] || apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi

# tftpd-hpa's in.tftpd, unpacked, not installed (the package would start a service on port 69,
# and it conflicts with atftpd, which the benchmarks run): tests/servers/test_tftp_modes.py
# compares netboot's netascii with what it sends, byte for byte.
IN_TFTPD=/opt/tftpd-hpa/usr/sbin/in.tftpd
if [ ! -x "$IN_TFTPD" ]; then
    work=$(mktemp -d /var/tmp/netboot-tftpd-hpa.XXXXXX)
    (cd "$work" && apt-get download -q tftpd-hpa)
    dpkg-deb -x "$work"/tftpd-hpa_*.deb /opt/tftpd-hpa
    rm -rf "$work"
fi

# tshark is optional (decoding only); its debconf question is pre-answered.
if ! command -v tshark >/dev/null 2>&1; then
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get install -y -q --no-install-recommends tshark \
        || echo "install-deps.sh: tshark not installed (optional; tcpdump decodes instead)" >&2
fi

# pgbouncer 1.21 or newer, beside Debian's: Debian 12 ships 1.18, which refuses to start with
# max_prepared_statements (1.21+), and tests/inventory/test_postgres.py checks that netboot
# still refuses transaction pooling with it (tests/pg.py looks for it here). Debian 13's .deb
# needs glibc 2.38 (bookworm has 2.36) and bookworm-backports has no pgbouncer, so it is built
# from Debian 13's source package, fetched through an apt source list, lists and cache of the
# build's own: the machine's apt sources and lists are not touched. Every other test runs
# Debian's pgbouncer. About a minute on 2 cores (benchmarks/README.md, s35-bouncer); skipped
# when the binary is there and runs (its libraries still installed) as 1.21 or newer.
PGBOUNCER_NEW=/opt/netboot-tests/pgbouncer/bin/pgbouncer
pgbouncer_new_enough() {
    # "PgBouncer 1.24.1" -> "1 24"
    v=$("$PGBOUNCER_NEW" --version 2>/dev/null \
        | sed -n 's/^PgBouncer \([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p')
    [ -n "$v" ] || return 1
    # shellcheck disable=SC2086
    set -- $v
    [ "$1" -gt 1 ] || { [ "$1" -eq 1 ] && [ "$2" -ge 21 ]; }
}
if ! pgbouncer_new_enough; then
    work=$(mktemp -d /var/tmp/netboot-pgbouncer.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]" \
        "http://deb.debian.org/debian trixie main" >"$work/trixie.list"
    own="-o Dir::Etc::sourcelist=$work/trixie.list -o Dir::Etc::sourceparts=- \
-o Dir::State::Lists=$work/lists -o Dir::Cache=$work/cache -o APT::Sandbox::User=root"
    # shellcheck disable=SC2086
    apt-get $own update -q
    # shellcheck disable=SC2086
    (cd "$work/src" && apt-get $own source -q pgbouncer)
    build=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'pgbouncer-*')
    (cd "$build" && ./configure -q --without-pam --without-systemd >/dev/null \
        && make -s -j"$(nproc)" >/dev/null)
    install -D -m 755 "$build/pgbouncer" "$PGBOUNCER_NEW"
    rm -rf "$work"
    trap - EXIT
    if ! pgbouncer_new_enough; then
        echo "install-deps.sh: the pgbouncer built from Debian 13's source is not 1.21+:" \
            "$("$PGBOUNCER_NEW" --version 2>&1 | head -1)" >&2
        exit 1
    fi
fi

if [ -z "${NO_PIP:-}" ]; then
    # A venv, not the system interpreter: Debian's python3 refuses pip installs (PEP 668).
    cd "$(dirname "$0")/.."
    venv="${NETBOOT_VENV:-.venv}"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    # Already installed (this checkout's netboot installed editable, every requirement of it and of
    # its test extra present at a version its pyproject.toml accepts): nothing to do. pip
    # itself would ask the index again and build an editable wheel in an isolated
    # environment it fetches setuptools into: 8-20 s and a network fetch on every run
    # (benchmarks/README.md, s36-ci).
    if ! "$venv/bin/python" -m tests.installed 2>/dev/null; then
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q -e '.[test]'
    fi
    # The wheels the packaging and container tests install from with --no-index, fetched
    # now while the package index is reachable (tests/wheels.py).
    "$venv/bin/python" -m tests.wheels >/dev/null
fi
echo "install-deps.sh: done"
