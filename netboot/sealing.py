"""Secrets at rest: one key file, AES-256-GCM, values sealed to the place they belong.

A provisioning server's database is copied around (backups, support bundles, a laptop that
ran ``netboot machines ls``); cluster join tokens in it would let whoever holds the copy join
a node to the cluster. So the values that are secrets are stored sealed with a key that lives
in a separate file (``<data_dir>/secret.key``, 0600), which backups can treat differently.

Named ``sealing`` rather than ``secrets`` so that it never shadows the standard library's
``secrets`` module, which the rest of netboot uses for token generation.

Format of a sealed value: ``nbs1:<key id>:<base64url(nonce || ciphertext || tag)>``. The key id
tells a wrong key file from a damaged value; the *context* (e.g. ``cluster-token:edge``) is
authenticated data, so a sealed token copied onto another cluster's row does not open.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from netboot.durable import link_new
from netboot.errors import ConfigError, StoreError

PREFIX = "nbs1:"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's standard nonce (NIST SP 800-38D §8.2: random 96-bit nonces)
# Standard base64 to its URL-safe alphabet (RFC 4648 §5), as base64.urlsafe_b64encode maps it.
_URLSAFE = bytes.maketrans(b"+/", b"-_")

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class Sealer:
    """Seals and opens short text values with one AES-256-GCM key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a sealing key is {KEY_BYTES} bytes, got {len(key)}")
        # The cipher is made at the first seal or unseal: ``serve`` opens an inventory
        # whose tokens are all sealed without either, and cryptography stays off its
        # start-up path (netboot.pki's module docstring).
        self._cipher: AESGCM | None = None
        # Not secret: names the key so that "wrong key file" is an error of its own.
        self.key_id = hashlib.sha256(b"netboot key id\0" + key).hexdigest()[:16]
        self._key = key

    @property
    def _aead(self) -> AESGCM:
        if self._cipher is None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._cipher = AESGCM(self._key)
        return self._cipher

    @classmethod
    def generate(cls) -> Sealer:
        return cls(secrets.token_bytes(KEY_BYTES))

    def seal(self, value: str, *, context: str) -> str:
        # os.urandom and binascii directly: what secrets.token_bytes and
        # base64.urlsafe_b64encode do, without their Python layers (every first install seals
        # its new token on the event loop).
        nonce = os.urandom(NONCE_BYTES)
        sealed = (self._cipher or self._aead).encrypt(nonce, value.encode(), context.encode())
        body = binascii.b2a_base64(nonce + sealed, newline=False).translate(_URLSAFE)
        return f"{PREFIX}{self.key_id}:{body.rstrip(b'=').decode()}"

    def unseal(self, value: str, *, context: str) -> str:
        """The clear text of a sealed value; a value without the prefix is returned as is
        (written before sealing existed, and sealed by the start-up migration)."""
        if not is_sealed(value):
            return value
        key_id, _, body = value[len(PREFIX):].partition(":")
        if key_id != self.key_id:
            raise StoreError(f"{context} was sealed with key {key_id}, but the key file is "
                             f"{self.key_id}: restore the secret.key that belongs to this "
                             "inventory")
        from cryptography.exceptions import InvalidTag

        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            clear = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
        except (binascii.Error, ValueError, InvalidTag) as exc:
            raise StoreError(f"{context} is damaged (it does not open with key "
                             f"{self.key_id})") from exc
        return clear.decode()

    def is_sealed(self, value: str) -> bool:
        return is_sealed(value)

    def key_text(self) -> str:
        """The key as the key file holds it (base64), for :func:`write_key` only."""
        return base64.b64encode(self._key).decode()

    def derive(self, purpose: str) -> bytes:
        """A separate secret for another use (the CA key's passphrase), never the key itself."""
        return base64.urlsafe_b64encode(
            hmac.digest(self._key, b"netboot derive\0" + purpose.encode(), "sha256"))


def is_sealed(value: str) -> bool:
    return value.startswith(PREFIX)


def read_key(path: Path) -> Sealer | None:
    """The sealer of an existing key file, None if there is none; ConfigError if unusable."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the secrets key {path}: {exc}", key="server.data_dir",
                          fix="make it readable by the netboot user (mode 0600)") from exc
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{path} is not a netboot secrets key ({KEY_BYTES} bytes, base64)",
                          key="server.data_dir",
                          fix="restore the file from a backup of this data dir")
    return Sealer(key)


def write_key(path: Path, sealer: Sealer) -> None:
    """Write the key file, 0600, refusing to replace one (a lost key cannot be re-made):
    FileExistsError if there is one.

    Whole or not at all: written and synced under a name of its own, then linked to
    ``path`` (link(2) refuses an existing name, as O_EXCL did) and the directory synced.
    Created at ``path`` and then written, a kill between the two (a first start stopped
    by systemd's timeout) left an empty key file, which every later start refused as "not
    a netboot secrets key ... restore the file from a backup": there was none to restore
    (s45-integrity). A kill before the link leaves only the unused ``.secret.key.*``."""
    fd, spare = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:  # mkstemp's mode: 0600
            fh.write(sealer.key_text() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        link_new(Path(spare), path)
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed where there are no links
            os.unlink(spare)
