"""X25519 and the two AEADs, loaded the cheapest way `cryptography` allows.

The public `X25519PrivateKey.generate()` / `from_public_bytes()` import cryptography's whole
OpenSSL backend (rsa, ec, padding, threading, random) only to ask whether X25519 is
supported, and `primitives.ciphers.aead` pulls in the cipher-mode machinery; on `rexec run`'s
start-up path that is ~11 ms of a ~60 ms budget (DESIGN.md 2a). The Rust binding underneath
is the very same implementation, so use it when it is there and fall back to the public API
when a future `cryptography` moves it. Type checkers see the public classes.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: typing (with re) is off `rexec run`'s path
if TYPE_CHECKING:
    from hashlib import sha256 as sha256_new

    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    FAST: bool

    def x25519_generate() -> X25519PrivateKey: ...
    def x25519_from_private_bytes(data: bytes) -> X25519PrivateKey: ...
    def x25519_public_from_bytes(data: bytes) -> X25519PublicKey: ...

else:
    # SHA-256 from the interpreter's own small module: hashlib sets up its own OpenSSL
    # (~3 ms), and cryptography's Hash loads its Python layer (typing, re, enum, warnings).
    try:
        from _sha2 import sha256 as sha256_new  # Python 3.12+
    except ImportError:
        try:
            from _sha256 import sha256 as sha256_new  # Python 3.11
        except ImportError:
            from hashlib import sha256 as sha256_new
    try:
        from cryptography.hazmat.bindings._rust import openssl as _rust

        AESGCM = _rust.aead.AESGCM
        ChaCha20Poly1305 = _rust.aead.ChaCha20Poly1305
        x25519_generate = _rust.x25519.generate_key
        x25519_from_private_bytes = _rust.x25519.from_private_bytes
        x25519_public_from_bytes = _rust.x25519.from_public_bytes
        FAST = True
    except (ImportError, AttributeError):  # depends on cryptography's internal layout
        from cryptography.hazmat.primitives.asymmetric.x25519 import (
            X25519PrivateKey,
            X25519PublicKey,
        )
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

        x25519_generate = X25519PrivateKey.generate
        x25519_from_private_bytes = X25519PrivateKey.from_private_bytes
        x25519_public_from_bytes = X25519PublicKey.from_public_bytes
        FAST = False

__all__ = [
    "AESGCM",
    "FAST",
    "ChaCha20Poly1305",
    "sha256_new",
    "x25519_from_private_bytes",
    "x25519_generate",
    "x25519_public_from_bytes",
]
