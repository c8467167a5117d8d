"""Per-run TLS: a CA and one certificate made for the run, kept owner-only in ``RUN_DIR/tls/``.

On a shared cluster anyone who reaches a Dask scheduler can run code as its owner. With these
files the scheduler, the workers and the driver accept only peers holding the run's certificate,
and everything between them is encrypted. Dask does not check host names, so one certificate
(for both server and client use) serves every process of the run.
"""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

from ..core import files
from ..core.errors import InputError, RunError
from ..store.rundir import RunDir

FILES = ("ca.pem", "cert.pem", "key.pem")


def ensure(run_dir: str | os.PathLike, days: int = 365,
           issued: datetime.datetime | None = None) -> dict[str, Path]:
    """The run's CA, certificate and key, made on first use (valid ``days`` from ``issued``, by
    default now); returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = RunDir(run_dir).tls
    paths = {name.split(".")[0]: d / name for name in FILES}
    if all(p.exists() for p in paths.values()):
        return checked(paths)
    old = os.umask(0o077)  # nothing here is ever readable by others, not even for a moment
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        now = issued or datetime.datetime.now(datetime.timezone.utc)
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


def checked(paths: dict[str, Path]) -> dict[str, Path]:
    """``paths`` once the run's TLS files are shown to be its owner's alone (a CA another user
    planted, or a key others can read, would let them in) and whole: a CA, a certificate it
    issued that has not expired, and that certificate's key. Else one line naming the file."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    d = paths["ca"].parent
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise _refused(d, d, "not a directory" if not stat.S_ISDIR(st.st_mode) else
                       f"it belongs to another user (uid {st.st_uid})" if st.st_uid != os.getuid() else
                       f"others may use it (mode {stat.S_IMODE(st.st_mode):04o})")
    for p in paths.values():   # before reading any: a FIFO would block
        if why := files.owned_file(p):
            raise _refused(d, p, why)
        if (mode := os.lstat(p).st_mode) & 0o077:
            raise _refused(d, p, f"others may read it (mode {stat.S_IMODE(mode):04o})")

    def load(name: str, loader, what: str):
        try:
            return loader(paths[name].read_bytes())
        except (ValueError, TypeError, OSError) as e:
            said = str(e).split(". See ")[0]   # not cryptography's link to its FAQ
            raise _refused(d, paths[name], f"not a PEM {what} ({said})") from e

    ca = load("ca", x509.load_pem_x509_certificate, "certificate")
    cert = load("cert", x509.load_pem_x509_certificate, "certificate")
    key = load("key", lambda b: serialization.load_pem_private_key(b, password=None), "private key")
    now = datetime.datetime.now(datetime.timezone.utc)
    for name, c in (("ca", ca), ("cert", cert)):
        if c.not_valid_after_utc < now:
            raise _refused(d, paths[name], f"it expired on {c.not_valid_after_utc:%Y-%m-%d}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise _refused(d, paths["cert"], f"not issued by {paths['ca'].name}") from e
    public = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*public) != key.public_key().public_bytes(*public):
        raise _refused(d, paths["key"], f"not the key of {paths['cert'].name}")
    return paths


def _refused(d: Path, path: Path, why: str) -> InputError:
    return InputError(f"{path}: {why}; the run's TLS files must be yours alone and whole: if you did not "
                      f"change them, remove {d} and `unidask tls {d.parent}` makes new ones (for every "
                      "process of the run)")


def security(run_dir: str | os.PathLike):
    """A Dask ``Security`` that requires TLS with the run's certificate, for every role."""
    from distributed import Security

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
