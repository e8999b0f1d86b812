"""Who is who in a run: the run's own certificate authority, one certificate per process.

A run has its own CA (an ECDSA P-256 key made for the run and thrown away
once the certificates are issued). It signs one certificate for the server
and one per worker; the worker's rank is in its certificate, as the URI
``flagagg://worker/<W>`` of its subjectAltName (and in its common name, for
people), the server's is ``flagagg://server``. Every connection is mutual
TLS (1.3) against that CA only: the server learns from the certificate which
worker it talks to, and a worker can be only that worker; a worker checks
that what answers holds the run's *server* certificate, not another
worker's. The extended key usage says the same (serverAuth for the server,
clientAuth for workers), so OpenSSL itself refuses a worker certificate
presented as a server's.

Each process gets one PEM file holding its own certificate, the CA
certificate and its private key (mode 0600): ``server.pem``,
``worker-0.pem``, ... (:func:`issue`).
"""

from __future__ import annotations

import datetime
import os
import re
import ssl
from pathlib import Path

__all__ = ["SERVER_URI", "client_context", "file_of", "identity", "issue", "server_context",
           "worker_uri"]

SERVER_URI = "flagagg://server"
_WORKER = re.compile(r"^flagagg://worker/(\d{1,6})$")


def worker_uri(worker):
    """The subjectAltName URI naming worker ``worker`` (0-based)."""
    return f"flagagg://worker/{int(worker)}"


def file_of(folder, rank):
    """The PEM file of ``rank`` (0: the server, else worker ``rank - 1``) in ``folder``."""
    return Path(folder, "server.pem" if rank == 0 else f"worker-{rank - 1}.pem")


def _write_private(path, data):
    """Write ``data`` to a file only its owner can read (created so, never widened)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def issue(folder, workers, *, days=30, hosts=()):
    """Make a run's CA and its certificates: ``server.pem`` and ``worker-W.pem`` in ``folder``.

    Parameters
    ----------
    folder : str or path-like
        Created (mode 0700) if needed.
    workers : int
        Number of workers p; files ``worker-0.pem`` .. ``worker-{p-1}.pem``.
    days : int, default=30
        Validity of the certificates.
    hosts : sequence of str, default=()
        DNS names or IP addresses of the server, for the record in its
        certificate (workers check the certificate's role, not its host).

    Returns
    -------
    paths : list of pathlib.Path
        The server's file first, then the workers' in order.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    workers = int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=int(days))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            f"flagagg run CA {os.urandom(8).hex()}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)

    def leaf(common_name, uri, usage, names=()):
        key = ec.generate_private_key(ec.SECP256R1())
        san = [x509.UniformResourceIdentifier(uri), *names]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        # the own certificate first (OpenSSL takes the first as the leaf), then the CA's
        return (cert.public_bytes(serialization.Encoding.PEM) + ca_pem
                + key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))

    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    paths = [_write_private(file_of(folder, 0),
                            leaf("flagagg server", SERVER_URI, ExtendedKeyUsageOID.SERVER_AUTH,
                                 names))]
    for w in range(workers):
        paths.append(_write_private(file_of(folder, w + 1),
                                    leaf(f"flagagg worker {w}", worker_uri(w),
                                         ExtendedKeyUsageOID.CLIENT_AUTH)))
    return paths


def _load(ctx, path):
    """Load the CA and the own certificate and key of one of :func:`issue`'s files."""
    path = Path(path)
    mode = path.stat().st_mode & 0o077
    if mode and os.name == "posix":
        raise PermissionError(f"{path} holds a private key but others can read it "
                              f"(mode {path.stat().st_mode & 0o777:o}): chmod 600 {path}")
    text = path.read_text(encoding="ascii")
    end = "-----END CERTIFICATE-----"
    certs = [c + end for c in text.split(end)[:-1]]
    if len(certs) != 2:
        raise ValueError(f"{path} is not a file of `flagagg certs` (its own certificate, the "
                         "run's CA certificate, its key)")
    # trust the run's CA, and nothing else (not the system's CAs)
    ctx.load_verify_locations(cadata=certs[1].strip())
    ctx.load_cert_chain(str(path))
    # TLS 1.3 only: forward secrecy, encrypted certificates, nothing to downgrade to
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def server_context(path):
    """The server's TLS context: its certificate, and every worker must present one of the run's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _load(ctx, path)


def client_context(path):
    """A worker's TLS context: its certificate, and the server must present the run's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # the run's CA names exactly one server; its host name is not what identifies it
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _load(ctx, path)


def identity(cert):
    """Who a verified peer certificate (``getpeercert()``) names: "server", a worker or None."""
    if not cert:
        return None
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    if len(uris) != 1:
        return None
    if uris[0] == SERVER_URI:
        return "server"
    m = _WORKER.match(uris[0])
    return int(m.group(1)) if m else None
