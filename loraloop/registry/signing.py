"""Ed25519 signatures over a version's manifest (its ``metadata.json`` bytes, files' sha256 included).

The sha256 sums in ``metadata.json`` catch accidents; anyone who can write the registry
can rewrite them too. The signature, made with a private key only publishers hold,
covers those exact bytes, so a reader configured with the public key refuses a version
whose weights and sums were both rewritten, and refuses unsigned versions outright.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from loraloop.registry.errors import RegistryError

SIGNATURE_FILE = "signature"
ALGORITHM = "ed25519"
MAX_SIGNATURE_BYTES = 4096


def _pem_bytes(value: str, what: str) -> bytes:
    """PEM text as given, or the contents of the file it names."""
    text = value.strip()
    if text.startswith("-----BEGIN"):
        return text.encode()
    path = Path(os.path.expanduser(text))
    try:
        return path.read_bytes()
    except OSError as e:
        raise RegistryError(f"{what}: neither PEM text nor a readable file: {path} ({e.strerror})") from e


def load_private_key(value: str) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``value`` (PEM text or a path to a PEM file).

    Raises:
        RegistryError: unreadable, not PEM, or not an Ed25519 key.
    """
    try:
        key = serialization.load_pem_private_key(_pem_bytes(value, "registry_signing_key"), password=None)
    except (ValueError, TypeError) as e:
        raise RegistryError(f"registry_signing_key is not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise RegistryError(f"registry_signing_key is a {type(key).__name__}, expected an Ed25519 key")
    return key


def load_public_key(value: str) -> Ed25519PublicKey:
    """The Ed25519 public key in ``value`` (PEM text or a path to a PEM file).

    Raises:
        RegistryError: unreadable, not PEM, or not an Ed25519 key.
    """
    try:
        key = serialization.load_pem_public_key(_pem_bytes(value, "registry_verify_key"))
    except (ValueError, TypeError) as e:
        raise RegistryError(f"registry_verify_key is not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise RegistryError(f"registry_verify_key is a {type(key).__name__}, expected an Ed25519 key")
    return key


def key_id(public: Ed25519PublicKey) -> str:
    """A short fingerprint of ``public``, so that an error can say which key signed."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_manifest(private: Ed25519PrivateKey, manifest: bytes) -> bytes:
    """The content of a version's ``signature`` file for ``manifest`` (its metadata.json bytes)."""
    return json.dumps({"algorithm": ALGORITHM, "key_id": key_id(private.public_key()),
                       "signature": base64.b64encode(private.sign(manifest)).decode()}, indent=1).encode()


def verify_manifest(public: Ed25519PublicKey, manifest: bytes, signature: bytes | None, where: str) -> None:
    """Refuse ``manifest`` unless ``signature`` is a valid signature of it by ``public``.

    Raises:
        RegistryError: no signature, an unreadable one, another key's, or one that does not match.
    """
    if signature is None:
        raise RegistryError(f"{where}: unsigned (no {SIGNATURE_FILE} file) and registry_verify_key is set; "
                            f"refusing an unsigned adapter")
    try:
        record = json.loads(signature)
        algorithm, signer, raw = record["algorithm"], record["key_id"], base64.b64decode(record["signature"],
                                                                                          validate=True)
    except (ValueError, TypeError, KeyError) as e:
        raise RegistryError(f"{where}: unreadable {SIGNATURE_FILE} file ({e!r}); refusing the adapter") from e
    if algorithm != ALGORITHM:
        raise RegistryError(f"{where}: signature algorithm {algorithm!r}, expected {ALGORITHM!r}")
    expected = key_id(public)
    try:
        public.verify(raw, manifest)
    except InvalidSignature:
        detail = (f"signed by key {signer!r}, not by the configured key {expected!r}" if signer != expected
                  else "metadata.json was changed after signing")
        raise RegistryError(f"{where}: bad signature ({detail}); refusing a tampered adapter") from None


def generate_key_pair(folder: str | Path) -> tuple[Path, Path]:
    """Write ``registry-signing.pem`` (mode 0600) and ``registry-verify.pem`` into ``folder``.

    Raises:
        RegistryError: either file already exists (a key is never overwritten).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / "registry-signing.pem", folder / "registry-verify.pem"
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing:
        raise RegistryError(f"refusing to overwrite existing key file(s) {existing}")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path
