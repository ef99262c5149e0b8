"""Ed25519 signatures of bundle digests (docs/bundle.md, "Signing").

The signature file (``manifest.sig``) is JSON: the algorithm, the signed digest, the key id (first 16
hex digits of the sha256 of the raw 32-byte public key) and the signature (base64) over the digest's
64 ASCII hex digits. Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), so OpenSSL and
other tools read them too. ``cryptography`` is imported only here and only when a key is used: the
benchmark binary needs it only with ``--public-key``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Any

from edge_msd.artifacts import atomic_write_bytes, atomic_write_json, read_json
from edge_msd.errors import ArtifactError, ConfigError

SIGNATURE_KIND = "edge-msd-bundle-signature"
ALGORITHM = "ed25519"
INSTALL = "pip install cryptography (or pip install 'edge-msd[sign]')"


def _crypto() -> tuple[Any, Any, Any]:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise ConfigError(f"bundle signatures need the cryptography package: {INSTALL}") from e
    return serialization, ed25519, InvalidSignature


def key_id(public_key: Any) -> str:
    """First 16 hex digits of the sha256 of the raw public key: names a key in messages and reports."""
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_key(path: Path, private: bool) -> Any:
    serialization, ed25519, _ = _crypto()
    what = "private" if private else "public"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} key ({e.strerror})") from e
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:  # not PEM, another key type, or an encrypted private key
        raise ConfigError(f"{path}: not an unencrypted PEM {what} key ({str(e).splitlines()[0]})") from e
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise ConfigError(f"{path}: a {type(key).__name__}, expected an Ed25519 {what} key "
                          "(edge-msd bundle keygen makes one)")
    return key


def generate_keys(private_path: Path, public_path: Path) -> str:
    """Write a new key pair (the private key readable by its owner only); returns its key id."""
    serialization, ed25519, _ = _crypto()
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; choose another name (keys are never overwritten)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    atomic_write_bytes(public_path, public_pem)
    return key_id(key.public_key())


def write_signature(path: Path, digest: str, private_key: Path) -> dict[str, str]:
    """Sign ``digest`` with the key in ``private_key`` and write the signature file ``path``."""
    key = _read_key(private_key, private=True)
    sig = {"kind": SIGNATURE_KIND, "algorithm": ALGORITHM, "digest": digest,
           "key_id": key_id(key.public_key()),
           "signature": base64.b64encode(key.sign(digest.encode("ascii"))).decode("ascii")}
    atomic_write_json(path, sig)
    return sig


def verify_signature(path: Path, digest: str, public_key: Path) -> dict[str, str]:
    """Check that ``path`` signs ``digest`` with ``public_key``; returns {algorithm, key_id, digest}."""
    _, _, invalid_signature = _crypto()
    key = _read_key(public_key, private=False)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; the bundle is not signed, but --public-key {public_key} asks "
                            "for a signature (edge-msd bundle sign BUNDLE --key PRIVATE.pem)")
    sig = read_json(path)
    if not isinstance(sig, dict) or sig.get("kind") != SIGNATURE_KIND or sig.get("algorithm") != ALGORITHM:
        raise ArtifactError(f"{path}: not an {ALGORITHM} {SIGNATURE_KIND} file")
    if sig.get("key_id") != key_id(key):
        raise ArtifactError(f"{path}: signed with key {sig.get('key_id')}, not with {public_key} "
                            f"(key {key_id(key)}): wrong public key or foreign signature")
    if sig.get("digest") != digest:
        raise ArtifactError(f"{path}: signs digest {sig.get('digest')}, but the manifest's digest is "
                            f"{digest} (the manifest was changed after signing)")
    try:
        key.verify(base64.b64decode(str(sig.get("signature")), validate=True), digest.encode("ascii"))
    except (invalid_signature, binascii.Error) as e:
        raise ArtifactError(f"{path}: the signature does not verify with {public_key} "
                            "(forged or damaged)") from e
    return {"algorithm": ALGORITHM, "key_id": sig["key_id"], "digest": digest}
