"""The test "installer": the ``/init`` of the initramfs every lab guest boots.

It stands in for a real OS installer just enough to prove the provisioning flow: it reads its
orders from the kernel command line that netboot rendered, fetches the per-machine config,
reports progress events, registers with its per-machine token, prints one line the harness
waits for and powers the VM off (QEMU runs with ``-no-reboot``, so the VM exits).

Kernel command line it reads (all rendered by netboot's profile template):
    netboot.config=URL     per-machine config (the token is already in its query string)
    netboot.events=URL     POST {"kind","message"} here, ``Authorization: Bearer <token>``
    netboot.register=URL   POST the registration here, same header
    netboot.token=TOKEN    the machine's token
    netboot.mac=MAC        which NIC to use (first non-loopback NIC when absent)

Console lines:
    ``NETBOOT-INSTALLER[<uptime>]: ...``                  progress, for humans
    ``NETBOOT-INSTALLER: result=ok mac=<mac> ip=<ip>``    success (what the tests wait for)
    ``NETBOOT-INSTALLER: result=fail reason=<reason>``    any fatal failure
    ``NETBOOT-INSTALLER[<uptime>]: secureboot=on|off|...`` what the firmware enforced (also
                                                          in the ``installed`` event)

Busybox 1.35 (Debian's busybox-static) ``wget`` supports ``--header`` and ``--post-data`` and
exits 0 on any 2xx status and 1 on 4xx/5xx (checked against a local server), which is what the
retry loops below rely on.
"""

from __future__ import annotations

INIT_SCRIPT = r"""#!/bin/busybox sh
# netboot test installer (netboot/lab/installer.py). Every loop below is bounded.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /usr/bin /sbin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
# URLs carry '?token=...': never let the shell glob them.
set -f

say() { echo "NETBOOT-INSTALLER[$(cut -d' ' -f1 /proc/uptime)]: $*"; }
halt() { sync; poweroff -f; sleep 10; echo b > /proc/sysrq-trigger; }
MAC=""; IP=""; TOKEN=""; CFG=""; EVT=""; REG=""

post() { # URL JSON -> wget's status (0 on any 2xx)
  wget -q -O /tmp/post.out --header "Authorization: Bearer $TOKEN" \
       --header "Content-Type: application/json" --post-data "$2" "$1"
}
fail() { # REASON: best-effort "failed" event, the result line, power off
  [ -n "$EVT" ] && [ -n "$IP" ] && post "$EVT" "{\"kind\":\"failed\",\"message\":\"$1\"}"
  echo "NETBOOT-INSTALLER: result=fail reason=$1"
  halt
}
event() { # KIND MESSAGE: retried, fatal when the server never accepts it
  n=0
  while [ $n -lt 5 ]; do
    post "$EVT" "{\"kind\":\"$1\",\"message\":\"$2\"}" && { say "event $1 accepted"; return 0; }
    n=$((n + 1)); sleep 1
  done
  fail "event-$1-rejected"
}

say "start: kernel $(uname -r) $(uname -m)"
# Secure Boot as the firmware told the kernel: the SecureBoot variable (EFI global GUID; its
# last byte is 1 when enforced), else the x86 kernel's own "secureboot:" line.
SB=unknown
[ -d /sys/firmware/efi ] || SB=no-efi
mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null
V=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
if [ -r "$V" ]; then
  case "$(tail -c 1 "$V" | od -An -tu1 | tr -d ' ')" in 1) SB=on ;; 0) SB=off ;; esac
elif dmesg | grep -q "secureboot: Secure boot enabled"; then SB=on
elif dmesg | grep -q "secureboot: Secure boot disabled"; then SB=off
fi
say "secureboot=$SB"
for a in $(cat /proc/cmdline); do
  case "$a" in
    netboot.config=*) CFG=${a#netboot.config=} ;;
    netboot.events=*) EVT=${a#netboot.events=} ;;
    netboot.register=*) REG=${a#netboot.register=} ;;
    netboot.token=*) TOKEN=${a#netboot.token=} ;;
    netboot.mac=*) MAC=$(echo "${a#netboot.mac=}" | tr 'A-F-' 'a-f:') ;;
  esac
done
[ -n "$CFG" ] || fail "no-netboot.config-on-cmdline"
[ -n "$EVT" ] || fail "no-netboot.events-on-cmdline"
[ -n "$REG" ] || fail "no-netboot.register-on-cmdline"
[ -n "$TOKEN" ] || fail "no-netboot.token-on-cmdline"

for m in $(cat /etc/modules.order); do
  insmod "/lib/modules/$m" 2>/dev/null || say "insmod $m failed (already loaded?)"
done

# The NIC shows up asynchronously after insmod: wait for it (at most 10 s).
IF=""; n=0
while [ -z "$IF" ] && [ $n -lt 100 ]; do
  # `ls`, not a glob: globbing is off (set -f) because of the URLs.
  for d in $(ls /sys/class/net); do
    [ "$d" = lo ] && continue
    a=$(cat "/sys/class/net/$d/address" 2>/dev/null)
    if [ -z "$MAC" ] || [ "$a" = "$MAC" ]; then IF=$d; break; fi
  done
  [ -z "$IF" ] && { sleep 0.1; n=$((n + 1)); }
done
[ -n "$IF" ] || fail "no-nic"
[ -n "$MAC" ] || MAC=$(cat "/sys/class/net/$IF/address")
ip link set lo up
ip link set "$IF" up
say "nic $IF mac $MAC, dhcp"

# e1000 needs a moment for link-up; udhcpc is retried rather than a fixed sleep.
n=0
while [ $n -lt 4 ]; do
  if udhcpc -i "$IF" -s /etc/udhcpc.script -n -q -t 5 -T 2 -V netboot-test-installer \
       >/tmp/udhcpc.log 2>&1; then break; fi
  n=$((n + 1))
done
[ -f /run/lease ] || { cat /tmp/udhcpc.log; fail "dhcp"; }
. /run/lease
IP=$ip
say "dhcp ok ip=$IP server=$serverid"

n=0
until wget -q -O /tmp/config "$CFG"; do
  n=$((n + 1)); [ $n -ge 10 ] && fail "config-fetch"
  sleep 2
done
say "config fetched ($(wc -c < /tmp/config) bytes)"
event installing "fetched config"
[ -s /tmp/config ] || fail "config-empty"

HOST=$(sed -n 's/^hostname:[[:space:]]*//p' /tmp/config | head -n 1 | tr -cd 'A-Za-z0-9.-')
[ -n "$HOST" ] || HOST="node-$(echo "$MAC" | tr -d ':')"
hostname "$HOST"
if [ -s /etc/machine-id ]; then MID=$(cat /etc/machine-id)
else MID=$(tr -d '-' < /proc/sys/kernel/random/uuid); fi
event installed "config ok, hostname $HOST, secureboot $SB"

BODY="{\"mac\":\"$MAC\",\"token\":\"$TOKEN\",\"hostname\":\"$HOST\",\"addresses\":[\"$IP\"],\"machine_id\":\"$MID\",\"node_name\":\"$HOST\"}"
n=0
until post "$REG" "$BODY"; do
  n=$((n + 1)); [ $n -ge 10 ] && fail "register-rejected"
  sleep 2
done
say "registered: $(head -c 200 /tmp/post.out)"
echo "NETBOOT-INSTALLER: result=ok mac=$MAC ip=$IP"
halt
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc hook: configure the lease and remember it for /init
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    { echo "ip=$ip"; echo "mask=$mask"; echo "serverid=$serverid"; } > /run/lease ;;
esac
exit 0
"""
