"""What a test compares an HTTPS listener's certificate with."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path


def leaf_der(path: Path) -> bytes:
    """The DER of the first certificate of a PEM file: netboot's ``cert_file`` holds the
    server's certificate, then its CA's. Not ``ssl.PEM_cert_to_DER_cert``, which is for a
    lone certificate: given the chain it base64-decodes all between the first BEGIN and the
    last END line, and binascii's lenient decoder stops at the leaf's ``=`` padding only
    when there is some. A leaf whose DER length is a multiple of 3 (a serial whose DER is 19
    bytes, not 20: 1 certificate in 256) came back with the CA's bytes after it, and
    tests/test_service.py's reload test failed once in S49's CI ("not the certificate
    served"; both began ``30 82 03 7d``, a length field of 893)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificates(path.read_bytes())[0].public_bytes(Encoding.DER)


async def served_certificate(port: int, host: str = "127.0.0.1") -> bytes:
    """The DER of the certificate a TLS handshake with ``host:port`` is given (unverified:
    the test compares it)."""
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=client), 10)
    try:
        peer: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return peer
    finally:
        writer.close()
