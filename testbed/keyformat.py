"""The filter's `key_format` with `"checksum": "crc32"`, for the tools that make keys
(scripts/keygen, the reference key service's mint): a prefix, 30 random base62 characters
from the operating system's cryptographic source, and the 6-digit base62 CRC-32 (zlib's)
of the random part, most significant digit first."""
import secrets
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_CHARS = 30


def checksum(random_part):
    n = zlib.crc32(random_part.encode())
    digits = ""
    for _ in range(6):
        n, d = divmod(n, 62)
        digits = BASE62[d] + digits
    return digits


def new_key(prefix):
    random_part = "".join(secrets.choice(BASE62) for _ in range(RANDOM_CHARS))
    return prefix + random_part + checksum(random_part)


def is_prefix(prefix):
    return isinstance(prefix, str) and 1 <= len(prefix) <= 64 and all(0x21 <= ord(c) <= 0x7E for c in prefix)
