"""The signed loaders for the shim-grub chain, where the lab's netboot finds them.

x86-64: the ``shim-signed`` and ``grub-efi-amd64-signed`` packages, installed (their files
are in /usr/lib/shim and /usr/lib/grub, which netboot searches by default too). arm64: the
``grub-efi-arm64-signed:arm64`` package cannot be installed beside the amd64 GRUB packages
(grub-common is not Multi-Arch), so it is fetched with ``apt-get download`` and unpacked into
the lab cache, like the arm64 kernel (netboot.lab.artifacts).
"""

from __future__ import annotations

from pathlib import Path

from netboot.lab.artifacts import ArtifactError, _locked, _run, cache_dir, download

SHIM_DIR = Path("/usr/lib/shim")
GRUB_DIR = Path("/usr/lib/grub")
ARM64_GRUB = "arm64-efi-signed/grubnetaa64.efi.signed"


def arm64_grub_root(cache: Path | None = None) -> Path:
    """A directory with ``arm64-efi-signed/grubnetaa64.efi.signed`` (an asset root)."""
    cache = cache or cache_dir()
    root = cache / "signed-arm64"
    if (root / ARM64_GRUB).is_file():
        return root
    with _locked(cache):
        deb = download("grub-efi-arm64-signed", "arm64", cache / "debs")
        unpacked = cache / "signed-arm64.tmp"
        _run(["rm", "-rf", str(unpacked)])
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        src = unpacked / "usr" / "lib" / "grub"
        if not (src / ARM64_GRUB).is_file():
            raise ArtifactError(f"{deb.name} has no {ARM64_GRUB}")
        _run(["rm", "-rf", str(root)])
        src.rename(root)
        _run(["rm", "-rf", str(unpacked)])
    return root


def asset_roots(cache: Path | None = None) -> list[Path]:
    """Where netboot finds shimx64.efi, grubx64.efi and grubaa64.efi (after the lab's own)."""
    for need, pkg in ((SHIM_DIR / "shimx64.efi.signed", "shim-signed"),
                      (GRUB_DIR / "x86_64-efi-signed/grubnetx64.efi.signed",
                       "grub-efi-amd64-signed")):
        if not need.is_file():
            raise ArtifactError(f"{need} missing: apt-get install {pkg}")
    return [SHIM_DIR, GRUB_DIR, arm64_grub_root(cache)]
