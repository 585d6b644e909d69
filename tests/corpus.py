"""Adversarial inputs for end-to-end tests: every case DESIGN §1 calls normal."""

from __future__ import annotations

import random


def _aligned(shards: int, line: int) -> bytes:
    # Lines of exactly `line` bytes, so that with `shards` shards of equal size
    # every nominal start s_i falls exactly on a line start.
    body = b"".join(b"%0*d\n" % (line - 1, i) for i in range(shards * 3))
    return body


def random_mix(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        n = rng.choice([0, 0, 1, 3, 10, 80, 700, 5000])
        out += bytes(rng.choice(b"abcdefghij \t\r") for _ in range(n))
        out += b"\n"
    if rng.random() < 0.5:
        out += b"no trailing newline"
    return bytes(out)


# name -> (data, delimiter)
CORPUS: dict[str, tuple[bytes, bytes]] = {
    "empty": (b"", b"\n"),
    "one-byte": (b"a", b"\n"),
    "one-newline": (b"\n", b"\n"),
    "only-newlines": (b"\n" * 17, b"\n"),
    "tiny-no-trailing": (b"ab\ncd", b"\n"),
    "no-trailing-newline": (b"first line\nsecond line\nthird line without end", b"\n"),
    "long-line-spanning-shards": (b"short\n" + b"x" * 5000 + b"\nend\n" + b"y" * 3000, b"\n"),
    "single-huge-line": (b"z" * 9000, b"\n"),
    "crlf": (b"alpha\r\nbeta\r\n\r\ngamma\r\ndelta", b"\n"),
    "utf8": ("héllo wörld\n日本語のテキスト\nemoji 🎉🎉\nΣ\n".encode() * 40, b"\n"),
    "aligned-4": (_aligned(4, 8), b"\n"),
    "aligned-7": (_aligned(7, 5), b"\n"),
    "nul-delimited": (b"\0".join(b"record %d\nwith newline" % i for i in range(200)) + b"\0", b"\0"),
    "nul-no-trailing": (b"a\0bb\0" + b"c" * 777, b"\0"),
    "random-mix": (random_mix(7, 60_000), b"\n"),
}
