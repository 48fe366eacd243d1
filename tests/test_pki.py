"""HTTPS: netboot's own CA and server certificate (checked with ``cryptography`` and with real
TLS clients on 127.0.0.1), re-issue on an address change, operator files, ``ca export``, and
the CA in what installers get."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import logging
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from netboot.cli import main
from netboot.config import load
from netboot.errors import ConfigError
from netboot.model import BootAction, BootPlan, MacAddress
from netboot.service import Service, build
from tests.conftest import this_checkout, write_config

ADVERTISE = "192.0.2.10"


def sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ({str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
            | set(ext.get_values_for_type(x509.DNSName)))


def client_context(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    return ctx


async def tls_get(port: int, ctx: ssl.SSLContext, server_hostname: str, path: str,
                  headers: str = "") -> bytes:
    """One HTTP/1.1 request over TLS to 127.0.0.1, naming the server as a device would."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname), 10)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {server_hostname}\r\n{headers}"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def started(tmp_path: Path, extra: str = "", https: str = "") -> Service:
    service = await build(load(write_config(tmp_path, extra, https=https), env={}))
    await service.start()
    return service


# --- netboot's own CA -----------------------------------------------------------------------------


async def test_first_start_makes_a_ca_and_a_certificate_for_the_configured_names(
        tmp_path: Path) -> None:
    service = await build(load(write_config(
        tmp_path, http="  public_url: http://boot.example:8080\n",
        https="  names: [netboot.lan, 198.51.100.7]\n"), env={}))
    try:
        tls_dir = service.config.data_dir / "tls"
        ca = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
        leaf, chained_ca = x509.load_pem_x509_certificates((tls_dir / "server.pem").read_bytes())
        assert chained_ca == ca
        leaf.verify_directly_issued_by(ca)
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        for cert in (ca, leaf):
            # iPXE verifies RSA with SHA-256 signatures.
            assert isinstance(cert.public_key(), rsa.RSAPublicKey)
            assert cert.public_key().key_size >= 2048  # type: ignore[union-attr]
            assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        assert sans(leaf) == {ADVERTISE, "boot.example", "netboot.lan", "198.51.100.7",
                              "localhost", "127.0.0.1", "::1"}  # this host's CLI, too
        assert leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > (
            datetime.timedelta(days=300))
        # The CA key is encrypted at rest; the passphrase is not stored beside it.
        pem = (tls_dir / "ca.key").read_bytes()
        assert b"ENCRYPTED PRIVATE KEY" in pem
        with pytest.raises(TypeError):
            serialization.load_pem_private_key(pem, password=None)
        assert service.tls is not None
        expected = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
        assert service.tls.ca_fingerprint.replace(":", "").lower() == expected
    finally:
        await service.close()


async def test_https_serves_the_api_to_a_client_that_trusts_the_exported_ca(
        tmp_path: Path) -> None:
    service = await started(tmp_path, https="  names: [127.0.0.1]\n")
    try:
        assert service.tls is not None and service.https_port > 0
        ctx = client_context(service.tls.ca_pem)
        admin = (service.config.data_dir / "admin.token").read_text().strip()
        # The name a device dials: the advertised address, from the certificate.
        reply = await tls_get(service.https_port, ctx, ADVERTISE, "/api/v1/machines",
                              f"Authorization: Bearer {admin}\r\n")
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        # aiohttp with the exported CA, on an address from https.names.
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://127.0.0.1:{service.https_port}/healthz",
                                ssl=ctx) as resp:
                assert resp.status == 200 and await resp.text() == "ok\n"
            # Firmware-facing downloads stay on plain HTTP.
            async with http.get(f"http://127.0.0.1:{service.http_port}/boot.ipxe") as resp:
                assert resp.status == 200 and (await resp.text()).startswith("#!ipxe")
        # A name the certificate does not carry, or a client without the CA, is refused.
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_get(service.https_port, ctx, "192.0.2.99", "/healthz")
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_get(service.https_port, ssl.create_default_context(), ADVERTISE,
                          "/healthz")
        assert "  HTTPS  https://" in service.summary()
        assert service.tls.ca_fingerprint in service.summary()
    finally:
        await service.close()


async def test_a_certificate_that_no_longer_names_the_address_is_reissued(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path)
    caplog.set_level(logging.INFO, logger="netboot.pki")
    first = await build(load(path, env={}))
    await first.close()
    # Why it was issued comes before the names it covers: after them, "…, 192.0.2.10 (none
    # yet)" read as something about the last address.
    issued = [r.getMessage() for r in caplog.records if "HTTPS certificate" in r.getMessage()]
    assert issued == [f"issued an HTTPS certificate (there was none) for {ADVERTISE}, "
                      "localhost, 127.0.0.1, ::1"], issued
    caplog.clear()
    tls_dir = first.config.data_dir / "tls"
    ca_before = (tls_dir / "ca.pem").read_bytes()
    leaf_before = (tls_dir / "server.pem").read_bytes()

    same = await build(load(path, env={}))  # nothing changed: nothing re-issued
    await same.close()
    assert (tls_dir / "server.pem").read_bytes() == leaf_before

    path.write_text(path.read_text().replace(f"advertise: {ADVERTISE}", "advertise: 192.0.2.11"))
    moved = await build(load(path, env={}))
    await moved.close()
    leaf = x509.load_pem_x509_certificates((tls_dir / "server.pem").read_bytes())[0]
    assert "192.0.2.11" in sans(leaf) and ADVERTISE not in sans(leaf)
    assert (tls_dir / "ca.pem").read_bytes() == ca_before  # devices keep trusting it
    assert any(r.getMessage().startswith("issued an HTTPS certificate (the previous one does "
                                         "not cover 192.0.2.11) for ")
               for r in caplog.records)


async def test_https_can_be_turned_off(tmp_path: Path) -> None:
    service = await started(tmp_path, https="  enabled: false\n")
    try:
        assert service.tls is None and service.https_port == 0
        assert not (service.config.data_dir / "tls").exists()
        assert "HTTPS  off" in service.summary()
    finally:
        await service.close()


# --- the operator's files ----------------------------------------------------------------------


def operator_pki(directory: Path, name: str = ADVERTISE) -> tuple[Path, Path, Path]:
    """A CA and a server certificate made here with cryptography alone."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(name))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "site.pem", directory / "site.key", directory / "site-ca.pem"
    paths[0].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


async def test_operator_files_are_served_as_given(tmp_path: Path) -> None:
    cert, key, ca = operator_pki(tmp_path / "site")
    service = await started(tmp_path, https=f"  cert_file: {cert}\n  key_file: {key}\n"
                                            f"  ca_file: {ca}\n")
    try:
        assert not (service.config.data_dir / "tls").exists()  # no CA of its own
        reply = await tls_get(service.https_port, client_context(ca.read_text()), ADVERTISE,
                              "/healthz")
        assert reply.startswith(b"HTTP/1.1 200")
    finally:
        await service.close()


def test_a_site_key_every_user_can_read_is_told(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """README: the site's key is "PEM, unencrypted, 0600"; one 0644 (a copy under the umask)
    was served without a word (s35-user). Told, not refused; 0640 (ssl-cert) is not told."""
    from netboot.pki import operator_files

    cert, key, ca = operator_pki(tmp_path / "site")
    for mode, told in ((0o644, True), (0o640, False), (0o600, False)):
        caplog.clear()
        key.chmod(mode)
        operator_files(str(cert), str(key), str(ca))
        lines = [r.getMessage() for r in caplog.records if "every user of this host" in
                 r.getMessage()]
        assert lines == ([f"https.key_file {key} is mode {mode:04o}: every user of this host "
                          "can read the HTTPS key; chmod 600 (or 640 for a group such as "
                          "ssl-cert)"] if told else []), (oct(mode), lines)


@pytest.mark.parametrize(("broken", "key"), [
    ("missing-cert", "https.cert_file"), ("not-pem", "https.cert_file"),
    ("other-key", "https.key_file"), ("missing-ca", "https.ca_file"),
])
async def test_bad_operator_files_stop_start_up_naming_the_key(
        tmp_path: Path, broken: str, key: str) -> None:
    cert, private, ca = operator_pki(tmp_path / "site")
    if broken == "missing-cert":
        cert = tmp_path / "nope.pem"
    elif broken == "not-pem":
        cert.write_text("hello\n")
    elif broken == "other-key":
        _, private, _ = operator_pki(tmp_path / "other")
    else:
        ca = tmp_path / "nope-ca.pem"
    path = write_config(tmp_path, https=f"  cert_file: {cert}\n  key_file: {private}\n"
                                         f"  ca_file: {ca}\n")
    with pytest.raises(ConfigError) as err:
        await build(load(path, env={}))
    assert err.value.key == key and err.value.fix
    # check-config finds it too, before any start.
    assert main(["check-config", str(path)]) == 2


@pytest.mark.parametrize(("https", "key"), [
    ("  cert_file: /etc/ssl/x.pem\n", "https.key_file"),
    ("  key_file: /etc/ssl/x.key\n", "https.cert_file"),
    ("  public_url: http://boot.example:8443\n", "https.public_url"),
    ("  port: 70000\n", "https.port"),
])
def test_https_settings_that_cannot_work_are_config_errors(tmp_path: Path, https: str,
                                                           key: str) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("  port: 0\n  listen: 127.0.0.1\n", https))
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert err.value.key == key and err.value.fix


@pytest.mark.parametrize(("https", "key", "given"), [
    ("  cert_file: /etc/ssl/x.pem\n", "https.key_file", "https.cert_file"),
    ("  key_file: /etc/ssl/x.key\n", "https.cert_file", "https.key_file"),
    ("  ca_file: /etc/ssl/ca.pem\n", "https.cert_file", "https.ca_file"),
])
def test_an_https_file_without_its_partner_names_the_line_given(
        tmp_path: Path, https: str, key: str, given: str) -> None:
    # The missing key has no line; the one given has, as every other setting's error
    # (s35-user found the file named and no line).
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("  port: 0\n  listen: 127.0.0.1\n", https))
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    line = path.read_text().splitlines().index(https.rstrip("\n")) + 1
    assert (err.value.key, err.value.source, err.value.line) == (key, str(path), line)
    assert str(err.value).startswith(f"{path}:{line}: {key}: not set, and {given} is given")


def test_https_on_the_http_port_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, extra="")
    path.write_text(path.read_text().replace("http:\n  port: 0", "http:\n  port: 8080")
                    .replace("  port: 0\n  listen: 127.0.0.1\n", "  port: 8080\n"))
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert err.value.key == "https.port"


# --- ca export and what installers get ---------------------------------------------------------


async def test_ca_export_prints_the_pem_and_its_fingerprint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(write_config(tmp_path))
    assert main(["ca", "export", "--config", path]) == 2  # none yet: says how to get one
    assert "start netboot once" in capsys.readouterr().err
    service = await build(load(path, env={}))
    await service.close()
    assert main(["ca", "export", "--config", path]) == 0
    out = capsys.readouterr().out
    ca_pem = (service.config.data_dir / "tls" / "ca.pem").read_text()
    first, rest = out.split("\n", 1)
    assert rest == ca_pem
    cert = x509.load_pem_x509_certificate(out.encode())  # the whole output is a PEM file
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert first == "# SHA256 Fingerprint=" + ":".join(
        digest[i:i + 2] for i in range(0, 64, 2)).upper()


async def test_installers_are_given_the_ca(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    service = await build(load(path, env={}))
    try:
        assert service.tls is not None
        admin = (service.config.data_dir / "admin.token").read_text().strip()
        from netboot.core import Core  # the server's own renders, as `netboot render` shows

        core: Core = Core(service.store, service.enroller, service.boot, service.content)
        await core.put("clusters", {"name": "edge", "server_url": "https://192.0.2.50:6443",
                                    "token": "k3s-join"}, create=True)
        await core.put("profiles", {"name": "k3os", "kernel": "vmlinuz"}, create=True)
        await core.put("profiles", {"name": "ci", "kernel": "vmlinuz",
                                    "config_template": "cloud-init"}, create=True)
        await core.create_machine({"mac": "52:54:00:00:00:21", "cluster": "edge",
                                   "profile": "k3os"}, note="test")
        await core.create_machine({"mac": "52:54:00:00:00:22", "cluster": "edge",
                                   "profile": "ci"}, note="test")
        k3os = yaml.safe_load(await core.render("52:54:00:00:00:21", "config"))
        (ca_file,) = k3os["write_files"]
        assert ca_file["path"] == "/var/lib/netboot/ca.pem"
        assert ca_file["content"] == service.tls.ca_pem
        nocloud = await core.render("52:54:00:00:00:22", "nocloud")
        user_data = yaml.safe_load(nocloud.split("--- user-data\n")[1].split("--- ")[0])
        assert user_data["ca_certs"]["trusted"] == [service.tls.ca_pem]
        assert service.tls.ca_fingerprint in nocloud
        assert admin not in nocloud
        served = await core.render("52:54:00:00:00:21", "config")
    finally:
        await service.close()
    # `netboot render` reads the same CA (it never makes one) and shows the same config.
    capsys.readouterr()
    args = ["render", "52:54:00:00:00:21", "config", "--config", str(path)]
    assert await asyncio.to_thread(main, args) == 0  # the CLI runs its own event loop
    assert capsys.readouterr().out.rstrip("\n") == served.rstrip("\n")


# --- renewal ------------------------------------------------------------------------------------


def test_a_certificate_near_its_end_is_reissued(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from netboot.pki import Authority

    now = datetime.datetime.now(datetime.UTC)
    first = Authority(tmp_path, b"passphrase", clock=lambda: now).server_certificate([ADVERTISE])
    issued = x509.load_pem_x509_certificates(first.cert_file.read_bytes())[0]
    caplog.set_level(logging.INFO, logger="netboot.pki")
    later = now + datetime.timedelta(days=380)  # within 30 days of its end
    Authority(tmp_path, b"passphrase", clock=lambda: later).server_certificate([ADVERTISE])
    renewed = x509.load_pem_x509_certificates(first.cert_file.read_bytes())[0]
    assert renewed.serial_number != issued.serial_number
    assert renewed.not_valid_after_utc > issued.not_valid_after_utc
    assert any("the previous one ends" in r.getMessage() for r in caplog.records)


async def test_a_running_server_serves_renewed_files_without_a_restart(tmp_path: Path) -> None:
    cert, key, ca = operator_pki(tmp_path / "site")
    service = await started(tmp_path, https=f"  cert_file: {cert}\n  key_file: {key}\n"
                                            f"  ca_file: {ca}\n")
    try:
        old_ca = ca.read_text()
        assert (await tls_get(service.https_port, client_context(old_ca), ADVERTISE,
                              "/healthz")).startswith(b"HTTP/1.1 200")
        # The operator's tooling renews the files in place (a new CA, to tell them apart).
        operator_pki(tmp_path / "site")
        service.reload_tls()
        new_ca = ca.read_text()
        assert new_ca != old_ca
        assert (await tls_get(service.https_port, client_context(new_ca), ADVERTISE,
                              "/healthz")).startswith(b"HTTP/1.1 200")
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_get(service.https_port, client_context(old_ca), ADVERTISE, "/healthz")
        assert service.tls is not None and service.tls.ca_pem == new_ca
        # What installers are given follows: the renders carry the new CA.
        assert service.content.context(BootPlan(
            mac=MacAddress.parse("52:54:00:00:00:31"), action=BootAction.LOCAL,
            reason="test"))["ca_pem"] == new_ca
    finally:
        await service.close()


# --- the record of the last check (start-up without cryptography) ---------------------------


def test_a_restart_with_the_same_files_decides_from_the_record_without_cryptography(
        tmp_path: Path) -> None:
    from netboot.pki import Authority

    first = Authority(tmp_path, b"passphrase").server_certificate([ADVERTISE, "localhost"])
    assert (tmp_path / "checked.json").exists()
    # Another process, as a restarted server: the same answer, and cryptography never loaded.
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from netboot.pki import Authority\n"
        f"tls = Authority(Path({str(tmp_path)!r}), b'passphrase').server_certificate("
        f"[{ADVERTISE!r}, 'LOCALHOST'])\n"
        "print(json.dumps([str(tls.cert_file), str(tls.key_file), tls.ca_pem, "
        "tls.ca_fingerprint, sorted(m for m in sys.modules if m.startswith('cryptography'))]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         env=this_checkout(), text=True, timeout=120).stdout
    assert json.loads(out) == [str(first.cert_file), str(first.key_file), first.ca_pem,
                               first.ca_fingerprint, []]


def test_the_record_decides_nothing_once_a_file_the_key_or_the_date_differs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from netboot.pki import Authority

    now = datetime.datetime.now(datetime.UTC)
    first = Authority(tmp_path, b"passphrase", clock=lambda: now).server_certificate([ADVERTISE])
    caplog.set_level(logging.INFO, logger="netboot.pki")
    # Another secret.key: the CA key does not open, as without a record.
    with pytest.raises(ConfigError, match=r"does not open with secret\.key"):
        Authority(tmp_path, b"another", clock=lambda: now).server_certificate([ADVERTISE])
    # A damaged server certificate is re-issued, not served from the record.
    first.cert_file.write_text("not a certificate\n")
    Authority(tmp_path, b"passphrase", clock=lambda: now).server_certificate([ADVERTISE])
    assert any("the previous one is unusable" in r.getMessage() for r in caplog.records)
    issued = x509.load_pem_x509_certificates(first.cert_file.read_bytes())[0]
    # A record edited to push the certificate's end away decides nothing: near its end, the
    # certificate is re-issued all the same.
    record = tmp_path / "checked.json"
    stored = json.loads(record.read_text())
    stored["body"]["not_after"] = (now + datetime.timedelta(days=3650)).isoformat()
    record.write_text(json.dumps(stored))
    caplog.clear()
    later = now + datetime.timedelta(days=380)
    Authority(tmp_path, b"passphrase", clock=lambda: later).server_certificate([ADVERTISE])
    renewed = x509.load_pem_x509_certificates(first.cert_file.read_bytes())[0]
    assert renewed.serial_number != issued.serial_number
    assert any("the previous one ends" in r.getMessage() for r in caplog.records)
