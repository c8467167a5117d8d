"""Per-run TLS: a CA and one certificate made for the run, kept owner-only in ``RUN_DIR/tls/``.

On a shared cluster anyone who reaches a Dask scheduler can run code as its owner. With these
files the scheduler, the workers and the driver accept only peers holding the run's certificate,
and everything between them is encrypted. Dask does not check host names, so one certificate
(for both server and client use) serves every process of the run.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from . import files
from .errors import InputError, RunError
from .rundir import RunDir

FILES = ("ca.pem", "cert.pem", "key.pem")


def ensure(run_dir: str | os.PathLike, days: int = 365) -> dict[str, Path]:
    """The run's CA, certificate and key, made on first use; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = RunDir(run_dir).tls
    paths = {name.split(".")[0]: d / name for name in FILES}
    if all(p.exists() for p in paths.values()):
        return paths
    old = os.umask(0o077)  # nothing here is ever readable by others, not even for a moment
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"unidask run CA {Path(run_dir).name}")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=days))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unidask")]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        contents = {
            "ca": ca.public_bytes(pem),
            "cert": cert.public_bytes(pem),
            "key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
        }
        for name, data in contents.items():
            files.write_atomic(paths[name], data)
    except OSError as e:
        raise RunError(f"cannot write the run's TLS files in {d}: {e.strerror or e}") from e
    finally:
        os.umask(old)
    return paths


def security(run_dir: str | os.PathLike):
    """A Dask ``Security`` that requires TLS with the run's certificate, for every role."""
    from distributed.security import Security

    p = ensure(run_dir)
    ca, cert, key = str(p["ca"]), str(p["cert"]), str(p["key"])
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key,
                    tls_worker_cert=cert, tls_worker_key=key, require_encryption=True)


def cli_args(run_dir: str | os.PathLike) -> list[str]:
    """The ``dask scheduler`` / ``dask worker`` flags for the run's certificate. Makes RUN_DIR
    (before any run.json: the scheduler starts first) but not its parents, so a mistyped path
    does not leave a stray tree."""
    if not (parent := Path(run_dir).absolute().parent).is_dir():
        raise InputError(f"{run_dir}: no directory {parent} to make the run dir in")
    p = ensure(run_dir)
    return ["--tls-ca-file", str(p["ca"]), "--tls-cert", str(p["cert"]), "--tls-key", str(p["key"])]
