"""Cryptographic building blocks of secure aggregation, all from maintained libraries.

- Key agreement: X25519 (``cryptography``); every shared secret goes through HKDF-SHA256 with an
  ``info`` string that binds it to the protocol, the job, the round, the purpose and the pair of sites,
  so a key from one round or job is useless in another.
- Masks: a ChaCha20 keystream (``cryptography``) from a 256-bit seed, read as ring elements. Never a
  numpy generator seeded from the secret (a 32-bit seed makes masks brute-forceable).
- Share transport: ChaCha20-Poly1305 under a pairwise HKDF key, with the sender, recipient, job and
  round as associated data, so a share cannot be redirected, replayed into another round or altered.
- Secret sharing: Shamir t-of-n over GF(2^128) from ``pycryptodome``; 32-byte secrets are shared as two
  16-byte halves with the same share index.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = b"monai_fl_ext/secagg/v1"
KEY_BYTES = 32
_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}
_RAW_PRIVATE = {"encoding": serialization.Encoding.Raw, "format": serialization.PrivateFormat.Raw,
                "encryption_algorithm": serialization.NoEncryption()}


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: the private key object and the 32-byte raw public key."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes(**_RAW)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(**_RAW_PRIVATE)


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def public_of(raw_private: bytes) -> bytes:
    """The raw public key of a raw private key (checks a reconstructed secret against its advertised key)."""
    return private_from_bytes(raw_private).public_key().public_bytes(**_RAW)


def context(job_id: str, round_num: int, purpose: str, *names: str) -> bytes:
    """The HKDF ``info`` / AEAD associated data binding a key or message to job, round, purpose and sites."""
    return b"|".join([PROTOCOL, job_id.encode(), str(round_num).encode(), purpose.encode(), *(n.encode() for n in names)])


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key from X25519 between ``private`` and ``peer_public``, expanded by HKDF-SHA256 with ``info``.

    Raises:
        ValueError: the peer key is not a valid 32-byte X25519 public key (or yields the all-zero secret).
    """
    if not isinstance(peer_public, bytes) or len(peer_public) != KEY_BYTES:
        raise ValueError(f"a public key must be {KEY_BYTES} raw bytes")
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def expand_mask(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """``length`` ring elements of ``dtype`` from the ChaCha20 keystream of ``seed``.

    Each seed is a fresh HKDF output used for exactly one mask, so the fixed all-zero nonce never repeats
    under a key.
    """
    dtype = np.dtype(dtype)
    out = np.zeros(length, dtype=dtype)
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    view = memoryview(out).cast("B")
    encryptor.update_into(view, view)  # keystream XOR zeros, in place: no second buffer of the mask's size
    return out


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption with a random nonce (prepended)."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Inverse of :func:`seal`.

    Raises:
        cryptography.exceptions.InvalidTag: wrong key, altered ciphertext or different associated data.
    """
    return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], associated)


def split_secret(secret: bytes, threshold: int, num_shares: int) -> list[tuple[int, bytes]]:
    """Shamir shares ``(index, 32 bytes)`` of a 32-byte secret; any ``threshold`` of them recover it."""
    if len(secret) != KEY_BYTES:
        raise ValueError(f"secrets are {KEY_BYTES} bytes, got {len(secret)}")
    lo = Shamir.split(threshold, num_shares, secret[:16])
    hi = Shamir.split(threshold, num_shares, secret[16:])
    return [(i, a + b) for (i, a), (j, b) in zip(lo, hi, strict=True) if i == j]


def combine_secret(shares: list[tuple[int, bytes]]) -> bytes:
    """The 32-byte secret from at least the threshold of Shamir shares (a wrong share gives a wrong secret: check it)."""
    lo = Shamir.combine([(i, s[:16]) for i, s in shares])
    hi = Shamir.combine([(i, s[16:]) for i, s in shares])
    return lo + hi


def commitment(secret: bytes, info: bytes) -> bytes:
    """SHA-256 commitment to a high-entropy secret, so a reconstruction can be checked."""
    return hashlib.sha256(info + b"|" + secret).digest()
