"""Development certificates and node keys for the Deployment Engine (Flower-free).

- :func:`init_certs`: a development CA, a TLS server certificate with the SANs operators
  connect to, and per node an ECDSA P-384 key pair in OpenSSH format (what
  ``ssh-keygen -t ecdsa -b 384`` writes) for SuperNode authentication;
- :func:`make_node_key`: one such node key pair;
- :func:`cert_sans`: the SANs of a certificate on disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


# --------------------------------------------------------------------------------------
# Certificates and node keys
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertBundle:
    """Paths written (or kept) by :func:`init_certs`."""

    root: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # name -> (private key, public key)
    sans: tuple[str, ...] = ()  # the SANs of the server certificate on disk
    ca_key: Path | None = None  # where the CA key was written/read (None: not touched)
    kept_server_cert: bool = False  # an existing server certificate was kept
    requested_sans: tuple[str, ...] = ()

    def public_key_line(self, name: str) -> str:
        return self.node_keys[name][1].read_text().strip()

    @property
    def missing_sans(self) -> tuple[str, ...]:
        """Requested SANs the (kept) server certificate does not carry."""
        return tuple(s for s in self.requested_sans if s not in self.sans)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """A new file created ``O_CREAT|O_EXCL`` with ``mode`` (private keys: 0600) in a folder
    created 0700; never overwrites."""
    from shared_model.release import write_private_file

    write_private_file(path, data, mode)


def _check_private(path: Path) -> Path:
    """A private key that is reused must be ours and 0600 (no group/world bits)."""
    from shared_model.release import check_private_file

    return check_private_file(path)


def _san_entries(sans: Iterable[str]) -> list[Any]:
    from cryptography import x509

    out: list[Any] = []
    for san in sans:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            out.append(x509.DNSName(san))
    return out


def cert_sans(cert_path: Path) -> tuple[str, ...]:
    """The SANs (IP addresses and DNS names) of a PEM certificate."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    ips = [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
    return tuple(ips + list(ext.get_values_for_type(x509.DNSName)))


LOOPBACK_SAN = "127.0.0.1"


def init_certs(
    root: Path,
    *,
    sans: Iterable[str] = ("127.0.0.1", "localhost"),
    nodes: int = 3,
    node_prefix: str = "node",
    days: int = 365,
    ca_key_path: Path | None = None,
) -> CertBundle:
    """Write a development CA, a server certificate and ``nodes`` node key pairs.

    Existing files are kept (re-running adds missing node keys only), so registered keys
    stay valid; the returned :attr:`CertBundle.sans` are those of the certificate on disk
    (:attr:`CertBundle.missing_sans`: requested but not in a kept certificate). Private keys
    are created ``O_CREAT|O_EXCL`` mode 0600 in 0700 folders; a reused private key that
    group/others can read is refused. ``127.0.0.1`` is always a SAN: the operator's own
    tools reach the SuperLink's Control API on loopback only.

    ``ca_key_path`` (default ``root/ca.key``) is where the CA key is written or read: point
    it at removable media to keep the CA key offline; it is only needed again to issue a
    new server certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from shared_model.release import ensure_private_dir

    root = ensure_private_dir(Path(root))
    requested = list(dict.fromkeys(sans)) or ["127.0.0.1", "localhost"]
    san_list = list(dict.fromkeys([*requested, LOOPBACK_SAN]))
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    nocrypt = serialization.NoEncryption()

    ca_cert_path = root / CA_CERT
    ca_key_path = Path(ca_key_path) if ca_key_path is not None else root / CA_KEY
    server_cert_path, server_key_path = root / SERVER_CERT, root / SERVER_KEY
    need_server = not (server_cert_path.exists() and server_key_path.exists())
    ca_key: Any = None
    if ca_cert_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        if need_server:
            if not ca_key_path.exists():
                raise FileNotFoundError(
                    f"{ca_key_path}: the CA key is needed to issue a server certificate "
                    "(pass --ca-key PATH where you keep it offline)"
                )
            ca_key = serialization.load_pem_private_key(
                _check_private(ca_key_path).read_bytes(), None
            )
    else:
        if ca_key_path.exists():
            raise FileExistsError(f"{ca_key_path} exists but {ca_cert_path} does not")
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrank development CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA384())
        )
        _write(ca_key_path, ca_key.private_bytes(pem, pkcs8, nocrypt), 0o600)
        _write(ca_cert_path, ca_cert.public_bytes(pem))

    if need_server:
        if server_cert_path.exists() or server_key_path.exists():
            raise FileExistsError(
                f"only one of {server_cert_path} / {server_key_path} exists: remove it to "
                "issue a new server certificate"
            )
        key = ec.generate_private_key(ec.SECP384R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, san_list[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(_san_entries(san_list)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA384())
        )
        _write(server_key_path, key.private_bytes(pem, pkcs8, nocrypt), 0o600)
        _write(server_cert_path, cert.public_bytes(pem))
    else:
        _check_private(server_key_path)

    node_keys: dict[str, tuple[Path, Path]] = {}
    for i in range(nodes):
        name = f"{node_prefix}-{i}"
        node_keys[name] = make_node_key(root / name)
    return CertBundle(
        root, ca_cert_path, server_cert_path, server_key_path, node_keys,
        sans=cert_sans(server_cert_path), ca_key=ca_key_path if ca_key_path.exists() else None,
        kept_server_cert=not need_server, requested_sans=tuple(requested),
    )


def make_node_key(private_path: Path) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: ``PATH`` (0600) and ``PATH.pub``.

    An existing pair is kept (its private half must be 0600 and ours)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    if private_path.exists() and public_path.exists():
        _check_private(private_path)
        return private_path, public_path
    if private_path.exists() or public_path.exists():
        raise FileExistsError(
            f"only one of {private_path} / {public_path} exists: remove it to make a new pair"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    _write(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(public_path, public + f" fedrank-{private_path.name}\n".encode())
    return private_path, public_path


