"""netboot's own certificate authority and server certificate, or the operator's files.

Why it looks like this:

* RSA keys and SHA-256 signatures: iPXE verifies RSA only (its crypto has no ECDSA), and it
  is the client with the fewest choices. 2048-bit keys, as most public CAs still issue, keep
  first start fast on small edge hardware.
* The CA is made once, on first start, and lives in ``<data_dir>/tls/``: ``ca.pem`` (0644, the
  thing to hand to installers, ``netboot ca export``) and ``ca.key`` (0600, encrypted with a
  passphrase derived from ``secret.key``, so a copy of the data dir without the key file is
  not a copy of the CA).
* The server certificate names what devices and operators dial: the advertised address, the
  host of ``http.public_url`` and ``https.names``. A certificate that no longer covers them
  (an address change), that this CA did not issue, or that ends within 30 days is re-issued
  on start, and the reason logged; devices that trust the CA keep trusting the new one.
* Operator files (``https.cert_file``/``key_file``, optionally ``ca_file``) are used as given,
  checked at start-up: readable, PEM, and the key belongs to the certificate.
* A running server checks again twice a day (the service re-runs the same preparation and
  reloads the files into its TLS context), so a server that runs for a year renews its own
  certificate, and an operator's renewed files are picked up without a restart.
* What a check of netboot's own files found is recorded beside them (``checked.json``: the
  names the certificate covers, its end, the CA's PEM and fingerprint), bound to the four
  files' contents and to the CA key's passphrase by an HMAC. A start whose files and
  ``secret.key`` are those of the last check decides from the record, the same decision
  without parsing anything: ``cryptography`` (~0.08 s of CPU to import, a tenth of
  ``serve``'s start-up) is imported only to make, re-issue or check certificates. Any change
  to a file, or another ``secret.key``, and the full check runs as before.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import ssl
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from netboot.errors import ConfigError

if TYPE_CHECKING:
    # Imported where certificates are made or parsed, not at import: see the module
    # docstring (checked.json).
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger(__name__)

_T = TypeVar("_T")

KEY_BITS = 2048
CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a server certificate; renewed on start
RENEW_BEFORE = datetime.timedelta(days=30)
# Beside the files in the CA's directory: what their last full check found (module docstring).
CHECKED_FILE = "checked.json"


@dataclass(frozen=True)
class Tls:
    """What the HTTPS listener and the templates need."""

    cert_file: Path  # server certificate, followed by the CA's when netboot issued it
    key_file: Path
    ca_pem: str  # the CA certificate installers should trust ("" if the operator gave none)
    ca_fingerprint: str  # SHA-256 of the CA certificate's DER, AA:BB:… ("" if none)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # iPXE speaks TLS 1.2
        self.load_into(ctx)
        return ctx

    def load_into(self, ctx: ssl.SSLContext) -> None:
        """(Re)load the certificate and key: later handshakes use them, open ones go on."""
        ctx.load_cert_chain(self.cert_file, self.key_file)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER certificate, as ``openssl x509 -fingerprint -sha256`` prints it."""
    from cryptography.hazmat.primitives import hashes

    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def server_names(advertise: str, public_url: str | None, extra: Sequence[str]) -> list[str]:
    """The names the server certificate must cover, in order, without duplicates."""
    names = [advertise]
    if public_url:
        host = urlsplit(public_url).hostname
        if host:
            names.append(host)
    names.extend(extra)
    out: list[str] = []
    for name in names:
        if name.lower() not in (n.lower() for n in out):
            out.append(name)
    return out


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename: a crash never leaves half a key."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _self_signed_ca(key: rsa.RSAPrivateKey, name: x509.Name, now: datetime.datetime, *,
                    path_length: int | None, usage: x509.KeyUsage) -> x509.Certificate:
    """A self-signed CA certificate of ``key`` (netboot's own CA, a k3s cluster's server CA),
    valid from an hour before ``now`` (devices with a slow clock) for CA_DAYS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def _san(name: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name.lower())


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]] | None:
    """The IP addresses and (lower-case) DNS names the certificate names; None without a
    subjectAltName extension."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return ({str(ip) for ip in san.get_values_for_type(x509.IPAddress)},
            {d.lower() for d in san.get_values_for_type(x509.DNSName)})


def _uncovered(sans: tuple[set[str], set[str]] | None, names: Sequence[str]) -> list[str]:
    if sans is None:
        return list(names)
    ips, dns = sans
    missing = []
    for name in names:
        try:
            address: str | None = str(ipaddress.ip_address(name))
        except ValueError:
            address = None
        if address is not None:
            if address not in ips:
                missing.append(name)
        elif name.lower() not in dns:
            missing.append(name)
    return missing


def covered(cert: x509.Certificate, names: Sequence[str]) -> list[str]:
    """The names the certificate does NOT cover (exact matches; no wildcards are issued)."""
    return _uncovered(_sans(cert), names)


# Keys netboot generated itself and keeps in its 0700 data dir are loaded without OpenSSL's
# RSA consistency check (primality of p and q: ~50 ms CPU per 2048-bit key, two keys, which
# was half of ``serve``'s start-up after imports). Whoever can rewrite those files holds the
# CA anyway; the pair is still checked (public key against the certificate). An operator's
# key (https.key_file) keeps the full check.
_OWN_KEY = True


class Authority:
    """netboot's CA in ``directory``: made on first use, then loaded."""

    def __init__(self, directory: Path, passphrase: bytes, *,
                 clock: Callable[[], datetime.datetime] = _now) -> None:
        self.directory = directory
        self._clock = clock
        self._passphrase = passphrase
        self.cert_path = directory / "ca.pem"
        self.private_file = directory / "ca.key"
        self.server_cert_path = directory / "server.pem"
        self.server_private_file = directory / "server.key"
        self.record_path = directory / CHECKED_FILE

    def files(self) -> tuple[bytes, bytes] | None:
        """The CA's two files as they are on disk (None: not both there)."""
        try:
            return self.cert_path.read_bytes(), self.private_file.read_bytes()
        except FileNotFoundError:
            return None

    def adopt(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Take another server's CA as this one's (its key encrypted as ``ca.key`` is, with
        the passphrase every server sharing ``secret.key`` derives alike): the server
        certificate is then re-issued by it (_why_reissue: not this CA's)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(self.private_file, key_pem, 0o600)
        _write(self.cert_path, cert_pem, 0o644)

    def load_or_create(self) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.cert_path.exists() or self.private_file.exists():
            return self._load()
        key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
        # A random suffix tells two netboot installations' CAs apart in a trust store.
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "netboot"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"netboot CA {secrets.token_hex(4)}"),
        ])
        cert = _self_signed_ca(key, name, self._clock(), path_length=0, usage=x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False))
        _write(self.private_file, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._passphrase)), 0o600)
        _write(self.cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        log.info("created netboot's certificate authority %s (fingerprint SHA256 %s)",
                 self.cert_path, fingerprint(cert))
        return cert, key

    def _load(self) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        fix = (f"restore {self.directory} and secret.key from a backup, or remove "
               f"{self.cert_path} and {self.private_file} to make a new CA (devices that trust "
               "the old one must then be given the new one)")
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            # netboot's own key, made by _issue/load_or_create (see _OWN_KEY).
            key = serialization.load_pem_private_key(self.private_file.read_bytes(),
                                                     password=self._passphrase,
                                                     unsafe_skip_rsa_key_validation=_OWN_KEY)
        except FileNotFoundError as exc:
            raise ConfigError(f"half a CA: {exc.filename} is missing", key="server.data_dir",
                              fix=fix) from exc
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"the CA in {self.directory} does not open with secret.key "
                              f"({exc})", key="server.data_dir", fix=fix) from exc
        if not isinstance(key, rsa.RSAPrivateKey) or key.public_key() != cert.public_key():
            raise ConfigError(f"{self.private_file} is not the key of {self.cert_path}",
                              key="server.data_dir", fix=fix)
        return cert, key

    def server_certificate(self, names: Sequence[str]) -> Tls:
        """The server certificate for ``names``, issued now if the one on disk will not do."""
        recorded = self._recorded(names)
        if recorded is not None:
            return recorded
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca_cert, ca_key = self.load_or_create()
        cert_path, private_file = self.server_cert_path, self.server_private_file
        reason = self._why_reissue(cert_path, private_file, ca_cert, names)
        if reason is not None:
            self._issue(cert_path, private_file, ca_cert, ca_key, names)
            # The reason before the names: after them, "…, 192.0.2.10 (none yet)" read as
            # something about the last address (s45-review).
            log.info("issued an HTTPS certificate (%s) for %s", reason, ", ".join(names))
        ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode()
        tls = Tls(cert_path, private_file, ca_pem, fingerprint(ca_cert))
        # The files just checked (or issued): the next start decides from the record.
        leaf = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        self._record(tls, _sans(leaf), leaf.not_valid_after_utc)
        return tls

    # -- the record of the last full check (module docstring) ----------------------------------
    def _files_digest(self) -> list[str] | None:
        """SHA-256 of the four files the check reads, in a fixed order; None if one is
        missing or unreadable (the full check then names the problem)."""
        try:
            return [hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in (self.cert_path, self.private_file, self.server_cert_path,
                              self.server_private_file)]
        except OSError:
            return None

    def _mac(self, body: dict[str, Any]) -> str:
        # Keyed by the CA key's passphrase: another secret.key (whose CA key would not
        # open) never matches, and the full check reports it as before.
        text = json.dumps(body, sort_keys=True).encode()
        return hmac.new(self._passphrase, b"netboot tls checked\0" + text,
                        hashlib.sha256).hexdigest()

    def _record(self, tls: Tls, sans: tuple[set[str], set[str]] | None,
                not_after: datetime.datetime) -> None:
        files = self._files_digest()
        if files is None:
            return
        body = {"format": 1, "files": files, "not_after": not_after.isoformat(),
                "sans": None if sans is None else [sorted(sans[0]), sorted(sans[1])],
                "ca_pem": tls.ca_pem, "ca_fingerprint": tls.ca_fingerprint}
        try:
            _write(self.record_path, json.dumps({"body": body, "mac": self._mac(body)}).encode(),
                   0o600)
        except OSError as exc:  # the next start runs the full check again: slower, not wrong
            log.debug("cannot write %s: %s", self.record_path, exc)

    def _recorded(self, names: Sequence[str]) -> Tls | None:
        """The certificate as the last full check found it, if the files and the passphrase
        are the same and the decision would be the same (it covers ``names`` and does not end
        within RENEW_BEFORE); None: run the full check."""
        try:
            stored = json.loads(self.record_path.read_bytes())
            body, mac = stored["body"], stored["mac"]
            if (not isinstance(body, dict) or body.get("format") != 1
                    or not isinstance(mac, str)
                    or not hmac.compare_digest(mac, self._mac(body))
                    or body["files"] != self._files_digest()):
                return None
            sans = body["sans"]
            if _uncovered(None if sans is None else (set(sans[0]), set(sans[1])), names):
                return None
            if datetime.datetime.fromisoformat(body["not_after"]) - self._clock() < RENEW_BEFORE:
                return None
            return Tls(self.server_cert_path, self.server_private_file, str(body["ca_pem"]),
                       str(body["ca_fingerprint"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _why_reissue(self, cert_path: Path, private_file: Path, ca: x509.Certificate,
                     names: Sequence[str]) -> str | None:
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization

        if not cert_path.exists() or not private_file.exists():
            return "there was none"
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(private_file.read_bytes(), password=None,
                                                     unsafe_skip_rsa_key_validation=_OWN_KEY)
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, OSError, InvalidSignature) as exc:
            return f"the previous one is unusable: {exc}"
        if key.public_key() != cert.public_key():
            return "the previous key does not match it"
        missing = covered(cert, names)
        if missing:
            return f"the previous one does not cover {', '.join(missing)}"
        if cert.not_valid_after_utc - self._clock() < RENEW_BEFORE:
            return f"the previous one ends {cert.not_valid_after_utc:%Y-%m-%d}"
        return None

    def _issue(self, cert_path: Path, private_file: Path, ca_cert: x509.Certificate,
               ca_key: rsa.RSAPrivateKey, names: Sequence[str]) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
        now = self._clock()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(min(now + datetime.timedelta(days=SERVER_DAYS),
                                 ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        # The key first: a certificate on disk without its key would be re-issued anyway.
        _write(private_file, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600)
        # Leaf then CA: clients that were given only the CA still get a complete chain.
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM)
               + ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_pem(path: str, key: str, parse: Callable[[bytes], _T], what: str, fix: str) -> _T:
    """Read and parse one operator file; ConfigError naming the key and the fix."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", key=key,
                          fix="check the path and that netboot's user can read it") from exc
    try:
        return parse(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} holds no {what} ({exc})", key=key, fix=fix) from exc


def _warn_if_world_readable(key_file: str) -> None:
    """The key of the site's certificate, readable by every user of the host (a copy made
    with the umask's 0644), lets any of them impersonate netboot to the operators' browsers
    and scripts. Told, not refused: a key 0640 for a group (Debian's ssl-cert) is usual, and
    netboot's own keys (ca.key, secret.key) are made 0600."""
    try:
        mode = stat.S_IMODE(os.stat(key_file).st_mode)
    except OSError:
        return  # read a moment ago: gone since, and the next read says so
    if mode & stat.S_IROTH:
        log.warning("https.key_file %s is mode %04o: every user of this host can read the "
                    "HTTPS key; chmod 600 (or 640 for a group such as ssl-cert)", key_file, mode)


def operator_files(cert_file: str, key_file: str | None, ca_file: str | None) -> Tls:
    """The operator's certificate, checked now so that a typo stops start-up, not the first
    TLS handshake."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if not key_file:
        raise ConfigError("a certificate needs its key", key="https.key_file",
                          fix="set https.key_file to the PEM private key of https.cert_file")
    certs = _load_pem(cert_file, "https.cert_file", x509.load_pem_x509_certificates,
                      "PEM certificate", "give the server certificate in PEM (BEGIN "
                      "CERTIFICATE), followed by its intermediates")
    key = _load_pem(key_file, "https.key_file",
                    lambda data: serialization.load_pem_private_key(data, password=None),
                    "unencrypted PEM private key", "give the key in PEM without a passphrase "
                    "(openssl pkey -in key.pem -out plain.pem), mode 0600")
    if key.public_key() != certs[0].public_key():
        raise ConfigError(f"{key_file} is not the key of the first certificate in {cert_file}",
                          key="https.key_file", fix="give the key that belongs to that "
                                                    "certificate (or reorder the PEM file)")
    _warn_if_world_readable(key_file)
    ca_pem, ca_fp = "", ""
    if ca_file:
        ca = _load_pem(ca_file, "https.ca_file", x509.load_pem_x509_certificate,
                       "PEM certificate", "give the CA certificate in PEM, or remove the key")
        ca_pem, ca_fp = ca.public_bytes(serialization.Encoding.PEM).decode(), fingerprint(ca)
    return Tls(Path(cert_file), Path(key_file), ca_pem, ca_fp)


def exported_ca(ca_file: str | None, directory: Path) -> tuple[str, str] | None:
    """(PEM, fingerprint) of the CA installers should trust, without making anything."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    path = Path(ca_file) if ca_file else directory / "ca.pem"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the CA certificate {path}: {exc}",
                          key="https.ca_file" if ca_file else "server.data_dir",
                          fix="give a PEM certificate") from exc
    return cert.public_bytes(serialization.Encoding.PEM).decode(), fingerprint(cert)


# --- a managed cluster's k3s server CA ------------------------------------------------------
#
# k3s's secure join token is ``K10<CA hash>::<user>:<password>``: before it sends anything, a
# joining node fetches the server's ``/cacerts`` and compares their hash with the token's
# (k3s pkg/clientaccess/token.go, validateCAHash), so a host that took the endpoint's address
# or name cannot collect the cluster's nodes. The CA does not exist until k3s's first server
# makes it, so netboot makes it instead: k3s uses CA files it finds in
# ``<data-dir>/server/tls/`` before its first start (pkg/daemons/control/deps,
# createSigningCertKey: a cert and key that both exist are used as they are; each CA on its
# own), and ``/cacerts`` serves that file's bytes as read (pkg/server/router.go, cacerts).
# Only the server CA is made: it is the one ``/cacerts`` serves and the token names; k3s
# makes the client, request-header and etcd CAs itself, and servers that join an HA cluster
# take those from its datastore (identical files on disk are left alone: pkg/cluster,
# isNewerFile), so netboot hands out no more key material than the secure token needs.

# Where k3s (data-dir /var/lib/rancher/k3s, k3OS's and the install script's) reads its server
# CA, and what /cacerts serves.
K3S_SERVER_CA = "/var/lib/rancher/k3s/server/tls/server-ca.crt"
K3S_SERVER_CA_KEY = "/var/lib/rancher/k3s/server/tls/server-ca.key"
# The user part of the secure token: what k3s's own node-token file names (servers and agents
# both accept it; k3s keeps only the password: pkg/util/token.go, NormalizeToken).
K3S_TOKEN_USER = "server"
# The user of an agent's secure token: k3s's servers keep the agent token as the password of
# user "node", group "k3s:agent" (pkg/daemons/control/deps, genUsers), which joins agents but
# not servers (the supervisor's /v1-k3s/server-bootstrap wants "k3s:server"), and write it as
# ``K10<CA hash>::node:<password>`` to ``server/agent-token``.
K3S_AGENT_USER = "node"


def k3s_server_ca(*, clock: Callable[[], datetime.datetime] = _now) -> tuple[str, str]:
    """(certificate PEM, key PEM) of a new k3s server CA, as k3s would make its own: RSA 2048
    (k3s releases before 2022 sign with an ``*rsa.PrivateKey`` only), self-signed, CA:TRUE,
    key usage digitalSignature, keyEncipherment, keyCertSign (k8s certutil
    NewSelfSignedCACert), ten years, the key in PKCS#1 PEM as k3s writes its own. One
    certificate: k3s hashes a one-certificate bundle as the file's literal bytes in every
    release (hashCA), a chain by its root's DER only in later ones."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    now = clock()
    # k3s's own name for it (deps.go: "<program>-server-ca@<unix time>").
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         f"k3s-server-ca@{int(now.timestamp())}")])
    cert = _self_signed_ca(key, name, now, path_length=None, usage=x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=True,
        data_encipherment=False, key_agreement=False, key_cert_sign=True,
        crl_sign=False, encipher_only=False, decipher_only=False))
    return (cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption()).decode("ascii"))


def k3s_ca_hash(ca_pem: str) -> str:
    """The CA hash of k3s's secure token for a server whose ``/cacerts`` serves ``ca_pem``:
    SHA-256 (hex) of the bundle's bytes, as k3s's hashCA takes a one-certificate bundle."""
    return hashlib.sha256(ca_pem.encode("ascii")).hexdigest()


def k3s_secure_token(password: str, ca_pem: str, *, user: str = K3S_TOKEN_USER) -> str:
    """``K10<CA hash>::<user>:<password>``: the secure form of a join secret (k3s
    clientaccess.FormatTokenBytes); ``user`` "server" for the cluster's token,
    :data:`K3S_AGENT_USER` for its agent token."""
    return f"K10{k3s_ca_hash(ca_pem)}::{user}:{password}"
