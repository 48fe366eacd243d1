"""A real-firmware netboot lab: QEMU guests booting from netboot inside network namespaces.

Used by the end-to-end suite (``tests/e2e``) and by ``netboot lab up|boot|down|status``.
Everything it creates lives in network namespaces it names itself (``<prefix>-sw``,
``<prefix>-dhcp``, ``<prefix>-srv``); the machine's own interfaces are never touched and
every process it starts is tracked and ended by its PID.

Modules:
    topology   namespaces, bridge, veths, taps; process tracking; sockets inside a namespace
    artifacts  Debian kernels + busybox initramfs images with the test installer, cached
    installer  the installer's ``/init`` (busybox sh) and udhcpc hook
    qemu       QEMU command lines per firmware kind, serial console capture, ``wait_for``
    sitedhcp   the site's DHCP server (dnsmasq): addresses only + IPv6 RA
    capture    tcpdump on the lab bridge, decoded on failure
    client     a small JSON HTTP client whose sockets live inside a lab namespace
    session    the pieces wired together (used by the CLI and the test fixtures)
    cli        ``netboot lab`` sub-commands
"""
