"""Boot artifacts for the lab: Debian kernels and busybox initramfs images with the installer.

Kernels come from Debian's archive with ``apt-get download`` (never installed on the host) and
``dpkg-deb -x``; the package is resolved through ``apt-cache depends linux-image-<arch>``
rather than pinned, because security updates bump the ABI number (lab finding). The arm64
packages need ``dpkg --add-architecture arm64`` and an ``apt-get update`` (tests/install-deps.sh).

Everything is cached under ``$NETBOOT_LAB_CACHE`` (default ``~/.cache/netboot-lab``):
``debs/`` holds the downloads, ``build/<arch>-<hash>/`` the built kernel + initramfs, keyed by
a hash of everything that goes in (deb contents, busybox, installer, module list, format), so
a second run only hashes and links.

The initramfs is written by :func:`write_cpio` (newc format, fixed mtimes, gzip mtime 0), so it
is reproducible and needs no ``cpio`` binary. It carries a ``/dev/console`` node so that the
kernel has a console for ``/init`` before devtmpfs is mounted.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from netboot.files import sha256_file
from netboot.lab.installer import FILES

log = logging.getLogger(__name__)

# Bump when the layout of what we build changes, so cached builds are not reused.
FORMAT = "netboot-lab-artifacts/1"

# NIC modules per kernel arch, with their dependencies resolved from modules.dep.
# amd64: virtio_pci + virtio_net for the iPXE/OVMF guests, e1000 as a spare; arm64: e1000 is
# what U-Boot guests use (U-Boot 2023.01's virtio-net reports MAC 52:52:52:52:52:52, lab
# gotcha 6), virtio_mmio/virtio_pci for completeness. af_packet is needed by udhcpc's raw
# socket; Debian builds it in, which is checked through modules.builtin.
MODULES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "amd64": ("virtio_pci", "virtio_net", "e1000", "af_packet"),
    "arm64": ("virtio_pci", "virtio_mmio", "virtio_net", "e1000", "af_packet"),
})

ARCHES = ("amd64", "arm64")


class ArtifactError(RuntimeError):
    """A kernel, busybox or initramfs could not be fetched or built; the message says why."""


@dataclass(frozen=True, slots=True)
class Artifacts:
    """The built files, all real files (no symlinks) in one directory ``dir``.

    Names: ``vmlinuz-<arch>`` and ``initrd-<arch>.cpio.gz`` for each built arch. The arm64
    kernel is an uncompressed ``Image``: U-Boot's ``booti`` cannot unpack a gzip one without
    ``kernel_comp_addr_r``.
    """

    dir: Path
    arches: tuple[str, ...]

    def kernel(self, arch: str) -> Path:
        return self.dir / f"vmlinuz-{arch}"

    def initrd(self, arch: str) -> Path:
        return self.dir / f"initrd-{arch}.cpio.gz"


def cache_dir() -> Path:
    env = os.environ.get("NETBOOT_LAB_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "netboot-lab"


def _run(argv: Sequence[str], *, cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=600
        )
    except FileNotFoundError as exc:
        raise ArtifactError(f"{argv[0]} not found: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ArtifactError(f"{' '.join(argv)} timed out after 600 s") from exc
    if res.returncode != 0:
        raise ArtifactError(
            f"{' '.join(argv)} failed (rc {res.returncode}): {res.stderr.strip()[-800:]}"
        )
    return res.stdout


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Serialise builds between concurrent runs sharing one cache."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def apt_spec(name: str, arch: str) -> str:
    """``apt-get`` package spec: the native arch needs no qualifier, foreign ones do."""
    native = _run(["dpkg", "--print-architecture"]).strip()
    return name if arch == native else f"{name}:{arch}"


def resolve_kernel_package(arch: str) -> str:
    """``linux-image-6.1.0-NN-<arch>``: what Debian's ``linux-image-<arch>`` depends on now."""
    out = _run(["apt-cache", "depends", apt_spec(f"linux-image-{arch}", arch)])
    for raw in out.splitlines():
        line = raw.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[1].split(":")[0]
    raise ArtifactError(
        f"apt-cache knows no linux-image-{arch}; for arm64 run "
        "'dpkg --add-architecture arm64 && apt-get update' (tests/install-deps.sh)"
    )


def download(name: str, arch: str, debs: Path) -> Path:
    """The cached ``<name>_*_<arch>.deb``, fetched with ``apt-get download`` when missing."""
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{name}_*_{arch}.deb"))
    if found:
        return found[-1]
    log.info("downloading %s (%s) into %s", name, arch, debs)
    _run(["apt-get", "download", "-q", apt_spec(name, arch)], cwd=debs)
    found = sorted(debs.glob(f"{name}_*_{arch}.deb"))
    if not found:
        raise ArtifactError(f"apt-get download {name}:{arch} left no .deb in {debs}")
    return found[-1]


def kernel_deb(arch: str, debs: Path) -> Path:
    try:
        name = resolve_kernel_package(arch)
    except ArtifactError:
        # Offline: fall back to whatever kernel a previous run downloaded.
        cached = sorted(debs.glob(f"linux-image-*-{arch}_*_{arch}.deb"))
        if not cached:
            raise
        log.warning("apt-cache failed; using cached %s", cached[-1].name)
        return cached[-1]
    return download(name, arch, debs)


# --- initramfs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One initramfs member. ``mode`` includes the file type bits (stat.S_IF*)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def write_cpio(entries: Sequence[CpioEntry]) -> bytes:
    """A newc ("070701") archive, the format the kernel unpacks as initramfs."""
    out = io.BytesIO()

    def pad() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    for ino, e in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = e.name.encode() + b"\0"
        fields = (
            ino if e.name != "TRAILER!!!" else 0,
            e.mode,
            0,  # uid
            0,  # gid
            2 if (e.mode & 0o170000) == 0o040000 else 1,  # nlink
            0,  # mtime: fixed, for a reproducible image
            len(e.data),
            0,  # devmajor
            0,  # devminor
            e.rdev[0],
            e.rdev[1],
            len(name),
            0,  # check
        )
        out.write(b"070701" + b"".join(f"{v:08x}".encode() for v in fields))
        out.write(name)
        pad()
        out.write(e.data)
        pad()
    return out.getvalue()


def _read_module(path: Path) -> tuple[str, bytes]:
    """(file name without compression suffix, uncompressed bytes): insmod takes plain .ko."""
    if path.name.endswith(".ko.xz"):
        return path.name[:-3], lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        data = subprocess.run(
            ["zstd", "-qdc", str(path)], capture_output=True, check=True, timeout=60
        ).stdout
        return path.name[:-4], data
    if path.name.endswith(".ko.gz"):
        return path.name[:-3], gzip.decompress(path.read_bytes())
    return path.name, path.read_bytes()


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def resolve_modules(mdir: Path, wanted: Sequence[str]) -> list[str]:
    """Paths (relative to ``mdir``) of ``wanted`` and their deps, dependencies first.

    A module that is built into the kernel (``modules.builtin``) is skipped; one that is
    neither loadable nor built in is an error, so a kernel config change fails the build
    instead of a boot 60 s later.
    """
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (mdir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_module_name(path)] = (path, rest.split())
    builtin_file = mdir / "modules.builtin"
    builtin = (
        {_module_name(p) for p in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    order: list[str] = []

    def visit(name: str, depth: int) -> None:
        if depth > 32:
            raise ArtifactError(f"module dependency loop at {name}")
        name = name.replace("-", "_")
        if name not in deps:
            if name in builtin:
                return
            raise ArtifactError(f"kernel module {name} is neither in modules.dep nor built in")
        path, needs = deps[name]
        if path in order:
            return
        for d in needs:
            visit(_module_name(d), depth + 1)
        if path not in order:
            order.append(path)

    for w in wanted:
        visit(w, 0)
    return order


def build_initramfs(kroot: Path, kver: str, busybox: bytes, modules: Sequence[str]) -> bytes:
    mdir = kroot / "lib" / "modules" / kver
    # Debian's kernel debs ship no modules.dep (it is generated at install time).
    if not (mdir / "modules.dep").exists():
        _run(["depmod", "-b", str(kroot), kver])
    entries = [
        CpioEntry(d, 0o040755)
        for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "run", "sys", "tmp")
    ]
    entries.append(CpioEntry("dev/console", 0o020600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", 0o100755, busybox))
    entries.append(CpioEntry("bin/sh", 0o120777, b"busybox"))
    order: list[str] = []
    for rel in resolve_modules(mdir, modules):
        name, data = _read_module(mdir / rel)
        entries.append(CpioEntry(f"lib/modules/{name}", 0o100644, data))
        order.append(name)
    modules_order = "".join(f"{m}\n" for m in order).encode()
    entries.append(CpioEntry("etc/modules.order", 0o100644, modules_order))
    for path, (mode, text) in sorted(FILES.items()):
        entries.append(CpioEntry(path, mode, text.encode()))
    log.info("initramfs for %s: modules %s", kver, " ".join(order))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(write_cpio(entries))
    return buf.getvalue()


def _busybox_from_deb(deb: Path, work: Path) -> bytes:
    dest = work / "busybox-deb"
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    bb = dest / "bin" / "busybox"
    if not bb.is_file():
        raise ArtifactError(f"{deb.name} has no bin/busybox")
    return bb.read_bytes()


def build_arch(arch: str, cache: Path) -> Path:
    """Build (or reuse) ``vmlinuz`` + ``initrd.cpio.gz`` for one arch; returns their dir."""
    debs = cache / "debs"
    kdeb = kernel_deb(arch, debs)
    bdeb = download("busybox-static", arch, debs)
    key = hashlib.sha256()
    for part in (FORMAT, arch, " ".join(MODULES[arch])):
        key.update(part.encode() + b"\0")
    for path, (mode, text) in sorted(FILES.items()):
        key.update(f"{path}\0{mode:o}\0{text}\0".encode())
    for deb in (kdeb, bdeb):
        # Content hash of the debs, memoised next to them by (name, size, mtime).
        st = deb.stat()
        memo = deb.with_suffix(".sha256")
        stamp = f"{deb.name} {st.st_size} {st.st_mtime_ns}"
        digest = None
        if memo.exists():
            saved_stamp, _, saved = memo.read_text().partition("\n")
            if saved_stamp == stamp:
                digest = saved.strip()
        if digest is None:
            digest = sha256_file(deb)
            memo.write_text(f"{stamp}\n{digest}\n")
        key.update(digest.encode())
    out = cache / "build" / f"{arch}-{key.hexdigest()[:16]}"
    if (out / "manifest.json").exists():
        return out
    log.info("building %s artifacts from %s into %s", arch, kdeb.name, out)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".work-") as tmp:
        work = Path(tmp)
        kroot = work / "k"
        _run(["dpkg-deb", "-x", str(kdeb), str(kroot)])
        kvers = sorted(p.name for p in (kroot / "lib" / "modules").iterdir())
        if len(kvers) != 1:
            raise ArtifactError(f"{kdeb.name}: expected one lib/modules/<ver>, got {kvers}")
        kver = kvers[0]
        kernel = (kroot / "boot" / f"vmlinuz-{kver}").read_bytes()
        if arch == "arm64" and kernel[:2] == b"\x1f\x8b":
            kernel = gzip.decompress(kernel)
        initrd = build_initramfs(kroot, kver, _busybox_from_deb(bdeb, work), MODULES[arch])
        stage = work / "out"
        stage.mkdir()
        (stage / "vmlinuz").write_bytes(kernel)
        (stage / "initrd.cpio.gz").write_bytes(initrd)
        manifest = {
            "format": FORMAT,
            "arch": arch,
            "kernel_deb": kdeb.name,
            "kernel_version": kver,
            "busybox_deb": bdeb.name,
            "modules": list(MODULES[arch]),
            "sha256": {
                "vmlinuz": hashlib.sha256(kernel).hexdigest(),
                "initrd.cpio.gz": hashlib.sha256(initrd).hexdigest(),
            },
        }
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    return out


def _link(src: Path, dst: Path) -> None:
    # Hard links, not symlinks: netboot's file tree refuses links that resolve outside a root.
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def ensure_artifacts(
    cache: Path | None = None, arches: Sequence[str] = ARCHES
) -> Artifacts:
    """Build what is missing and return the directory netboot should serve."""
    cache = cache or cache_dir()
    for a in arches:
        if a not in MODULES:
            raise ArtifactError(f"unknown arch {a!r}; known: {', '.join(MODULES)}")
    with _locked(cache):
        built = {a: build_arch(a, cache) for a in arches}
        combined = hashlib.sha256("".join(str(built[a]) for a in arches).encode()).hexdigest()
        dest = cache / "assets" / combined[:16]
        if not (dest / ".complete").exists():
            dest.mkdir(parents=True, exist_ok=True)
            for a, src in built.items():
                _link(src / "vmlinuz", dest / f"vmlinuz-{a}")
                _link(src / "initrd.cpio.gz", dest / f"initrd-{a}.cpio.gz")
            (dest / ".complete").write_text("ok\n")
    return Artifacts(dir=dest, arches=tuple(arches))
