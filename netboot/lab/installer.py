"""The test "installer": the ``/init`` of the initramfs every lab guest boots.

It stands in for a real OS installer and the OS it installs just enough to prove the
provisioning flow: it reads its orders from the kernel command line that netboot rendered,
fetches the per-machine k3OS config, reports progress events, then behaves like the installed
k3OS on its first boot: sets the hostname from the config, maps it to 127.0.1.1 in
``/etc/hosts`` (as k3OS does) and runs the config's ``run_cmd`` items exactly as given, with
``sh -c`` and busybox only (no curl): that is how the machine registers. It prints one line
the harness waits for and powers the VM off (QEMU runs with ``-no-reboot``, so it exits).

Kernel command line it reads (all rendered by netboot's profile template):
    netboot.config=URL     per-machine config (the token is already in its query string)
    netboot.events=URL     POST {"kind","message"} here, ``Authorization: Bearer <token>``
    netboot.token=TOKEN    the machine's token
    netboot.mac=MAC        which NIC to use (first non-loopback NIC when absent)
    netboot.k3s=standin    also act out k3s from the config's ``k3os:`` section (below)

With ``netboot.k3s=standin`` (this machine has no k3s binary): a node whose ``k3s_args``
start with ``server`` listens on TCP 6443 with busybox ``nc`` and stays up, answering each
join line with ``accepted``/``refused`` after comparing the token (the server's, or the
agent token its k3s config file gives) as k3s would; an agent
takes ``server_url`` and ``token`` from its config and connects to that host and port.

Console lines:
    ``NETBOOT-INSTALLER[<uptime>]: ...``                  progress, for humans
    ``NETBOOT-INSTALLER: os hostname=<h> resolves=<addr> curl=<path|absent>``
    ``NETBOOT-INSTALLER: k3s role=<r> init=<yes|no> server_url=<url|none>``   (stand-in)
    ``NETBOOT-INSTALLER: join=ok server=<host>:<port> reply=<reply>``         (stand-in agent)
    ``NETBOOT-K3S: <accepted|refused> join node=<n> ip=<ip>``   (stand-in server, per join)
    ``NETBOOT-INSTALLER: result=ok mac=<mac> ip=<ip>[ role=server listening=6443]``
    ``NETBOOT-INSTALLER: result=fail reason=<reason>``    any fatal failure
    ``NETBOOT-INSTALLER[<uptime>]: secureboot=on|off|...`` what the firmware enforced (also
                                                          in the ``installed`` event)

Busybox 1.35 (Debian's busybox-static) ``wget`` supports ``--header`` and ``--post-data`` and
exits 0 on any 2xx status and 1 on 4xx/5xx (checked against a local server), which is what the
retry loops below rely on; its ``nc`` has ``-l -p`` and ``-ll -e`` (a persistent server).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

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
MAC=""; IP=""; TOKEN=""; CFG=""; EVT=""; K3S=""

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
cfg() { # KEY [OUT-PREFIX]: a value (or list items) of the fetched k3OS config
  awk -v key="$1" -v out="$2" -f /etc/k3os-config.awk /tmp/config
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
    netboot.token=*) TOKEN=${a#netboot.token=} ;;
    netboot.mac=*) MAC=$(echo "${a#netboot.mac=}" | tr 'A-F-' 'a-f:') ;;
    netboot.k3s=*) K3S=${a#netboot.k3s=} ;;
  esac
done
[ -n "$CFG" ] || fail "no-netboot.config-on-cmdline"
[ -n "$EVT" ] || fail "no-netboot.events-on-cmdline"
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

# --- from here on: the installed OS's first boot -------------------------------------
HOST=$(cfg hostname | tr -cd 'A-Za-z0-9.-')
[ -n "$HOST" ] || HOST="node-$(echo "$MAC" | tr -d ':')"
hostname "$HOST"
# As on k3OS: the hostname resolves to a loopback alias, never to the NIC's address.
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$HOST" > /etc/hosts
[ -s /etc/machine-id ] || tr -d '-' < /proc/sys/kernel/random/uuid > /etc/machine-id
echo "NETBOOT-INSTALLER: os hostname=$HOST resolves=$(hostname -i 2>&1)" \
     "curl=$(command -v curl || echo absent)"
event installed "config ok, hostname $HOST, secureboot $SB"

# k3OS runs each run_cmd item with `sh -c` at boot: so does this, exactly as rendered.
rm -rf /tmp/run_cmd && mkdir /tmp/run_cmd
cfg run_cmd /tmp/run_cmd/ || fail "run_cmd-unreadable"
for f in $(ls /tmp/run_cmd | sort -n); do
  say "run_cmd $f: $(head -c 40 "/tmp/run_cmd/$f") ..."
  # Bounded: a command that retries for an hour (every 10 s) gets 45 s here, so a refused
  # registration fails the boot within the harness's wait for the result line.
  timeout 45 sh -c "$(cat "/tmp/run_cmd/$f")"; rc=$?
  echo
  say "run_cmd $f exited $rc"
done
# The registration command's own marker: it touches it once netboot accepted the POST.
[ -f /var/lib/netboot/registered ] || fail "run_cmd-did-not-register"
say "registered through run_cmd"

if [ "$K3S" = standin ]; then
  ROLE=$(cfg k3os.k3s_args | head -n 1)
  URL=$(cfg k3os.server_url)
  TOK=$(cfg k3os.token)
  INIT=no; cfg k3os.k3s_args | grep -qx -e --cluster-init && INIT=yes
  echo "NETBOOT-INSTALLER: k3s role=$ROLE init=$INIT server_url=${URL:-none}"
  [ -n "$TOK" ] || fail "k3s-no-token"
  case "$ROLE" in
    server)
      printf '%s\n' "$TOK" > /run/k3s.token
      # The agent token's secret, as k3s reads it from its config file (agent-token), which
      # the config writes as one JSON-quoted line: agents join with it, not with $TOK.
      sed -n 's/.*"agent-token: \\"\([0-9A-Za-z]*\)\\"\\n".*/\1/p' /tmp/config \
        > /run/k3s.agent-token
      nc -ll -p 6443 -e /bin/k3s-standin &
      n=0
      until netstat -ltn | grep -q ':6443 '; do
        n=$((n + 1)); [ $n -ge 50 ] && fail "k3s-standin-not-listening"
        sleep 0.1
      done
      post "$EVT" '{"kind":"k3s-standin","message":"listening on 6443"}' || true
      echo "NETBOOT-INSTALLER: result=ok mac=$MAC ip=$IP role=server listening=6443"
      # This guest is its cluster's server now: stay up (bounded) until the harness stops it.
      sleep 1800
      halt
      ;;
    agent)
      [ -n "$URL" ] || fail "k3s-no-server_url"
      HP=${URL#https://}; HP=${HP%%/*}; SH=${HP%:*}; SP=${HP##*:}
      [ "$SP" = "$HP" ] && SP=6443
      n=0; ANS=""
      while [ $n -lt 10 ]; do
        ANS=$(echo "join node=$HOST ip=$IP token=$TOK" | nc -w 5 "$SH" "$SP" 2>&1)
        [ "${ANS%% *}" = accepted ] && break
        say "join $SH:$SP: ${ANS:-no answer} (try $((n + 1))/10)"
        n=$((n + 1)); sleep 2
      done
      [ "${ANS%% *}" = accepted ] || fail "k3s-join-$SH:$SP"
      post "$EVT" "{\"kind\":\"k3s-joined\",\"message\":\"$SH:$SP $ANS\"}" || true
      echo "NETBOOT-INSTALLER: join=ok server=$SH:$SP reply=$ANS"
      ;;
    *) fail "k3s-role-$ROLE" ;;
  esac
fi
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

# A reader for the k3OS config.yaml netboot renders: a subset of YAML (top-level keys, one
# level of nested keys, "- item" lists, double-quoted scalars with JSON/YAML escapes, plain
# scalars, comments). Busybox has no YAML parser; a template that leaves this subset makes
# the reader exit 2 naming the line, rather than run half a command.
#   awk -v key=hostname -f k3os-config.awk config.yaml            a scalar, on stdout
#   awk -v key=k3os.server_url ...                                  a nested scalar
#   awk -v key=run_cmd -v out=/tmp/run_cmd/ ...                     list items, to out1, out2…
# Exit 1 when the key is absent.
CONFIG_AWK = r"""
function bad(msg) {
  printf "k3os-config.awk: line %d: %s\n", NR, msg > "/dev/stderr"; failed = 1; exit 2
}
function unquote(s,    out, i, c, n, h, v) {
  if (substr(s, 1, 1) == "'") bad("single-quoted scalars are not supported")
  if (substr(s, 1, 1) != "\"") { sub(/[ \t]+#.*$/, "", s); sub(/[ \t]+$/, "", s); return s }
  out = ""
  for (i = 2; i <= length(s); i++) {
    c = substr(s, i, 1)
    if (c == "\"") return out
    if (c != "\\") { out = out c; continue }
    i++; c = substr(s, i, 1)
    if (c == "n") out = out "\n"
    else if (c == "t") out = out "\t"
    else if (c == "\\" || c == "\"" || c == "/") out = out c
    else if (c == "u") {
      v = 0
      for (n = 1; n <= 4; n++) {
        h = index("0123456789abcdef", tolower(substr(s, i + n, 1)))
        if (!h) bad("bad \\u escape")
        v = v * 16 + h - 1
      }
      if (v < 1 || v > 126) bad("\\u escape outside ASCII")
      out = out sprintf("%c", v); i += 4
    } else bad("unsupported escape \\" c)
  }
  bad("unterminated string")
}
BEGIN { parts = split(key, path, "."); n = 0; found = 0 }
/^[ \t]*#/ || /^[ \t]*$/ { next }
{ match($0, /^ */); ind = RLENGTH; line = substr($0, ind + 1); rest = line }
line ~ /^[A-Za-z0-9_]+:/ {
  k = substr(line, 1, index(line, ":") - 1); sub(/^[^:]*:[ \t]*/, "", rest)
  if (ind == 0) { top = k; sub1 = "" } else if (ind == 2) sub1 = k
  if (rest != "" && ((parts == 1 && ind == 0 && k == path[1]) ||
                     (parts == 2 && ind == 2 && top == path[1] && k == path[2]))) {
    print unquote(rest); found = 1
  }
  next
}
line ~ /^- / && top == path[1] && ((parts == 1 && sub1 == "") || (parts == 2 && sub1 == path[2])) {
  v = unquote(substr(line, 3)); n++; found = 1
  if (out != "") { printf "%s", v > (out n); close(out n) } else print v
}
END { if (failed) exit 2; exit found ? 0 : 1 }
"""

# Run by `nc -ll -p 6443 -e` on a stand-in server, once per connection, socket on stdin and
# stdout: one join line in, one verdict out, and the verdict on the console for the harness.
K3S_STANDIN = r"""#!/bin/sh
read -r line
tok=${line##* token=}
# An agent joins with the server token or with the agent token (its password: the part after
# the last ":" of K10<hash>::node:<password>, or all of a short one), as k3s's passwd has them.
agent=$(cat /run/k3s.agent-token)
if [ "$tok" = "$(cat /run/k3s.token)" ] || { [ -n "$agent" ] && [ "${tok##*:}" = "$agent" ]; }
then verdict=accepted; else verdict=refused; fi
echo "NETBOOT-K3S: $verdict ${line%% token=*}" > /dev/console
echo "$verdict by $(hostname)"
"""

# Every file the installer adds to the initramfs: path → (mode with file type, text).
FILES: Mapping[str, tuple[int, str]] = MappingProxyType({
    "init": (0o100755, INIT_SCRIPT),
    "etc/udhcpc.script": (0o100755, UDHCPC_SCRIPT),
    "etc/k3os-config.awk": (0o100644, CONFIG_AWK),
    "bin/k3s-standin": (0o100755, K3S_STANDIN),
})
