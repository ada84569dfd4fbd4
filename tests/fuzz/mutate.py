"""A deterministic mutator for the fuzz runner: every choice comes from one seeded PRNG.

Byte-level operators (bit flips, interesting integers, inserts, deletes, duplications,
splices with another corpus entry, truncations) for every harness; with ``yaml=True`` also
structure-aware ones: alias fan-outs, deep nesting, odd scalars in value positions, line
duplication and re-indentation, keys from the harness's dictionary.
"""

from __future__ import annotations

import random
import struct

INTERESTING_8 = (0, 1, 2, 0x7F, 0x80, 0xFE, 0xFF)
INTERESTING_16 = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0x3FF, 0x7FFF, 0x8000, 0xFFFF)
INTERESTING_32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x10000, 0xFFFF)
# Scalars that broke parsers before: unicode digits isdigit() accepts but int() refuses,
# integers past Python's 4300-digit limit, YAML's other integer forms, bytes not UTF-8.
ODD_SCALARS = (b"\xc2\xb2", "\u0663".encode(), "\u00b9\u00b2".encode(), b"9" * 4400,
               b"-1", b"0", b"65536", b"0x10", b"0o17", b"190:20:30", b"1_000", b"1e999",
               b"~", b"null", b"''", b'""', b"\xff", b"\xc3", b"[]", b"{}", b"!!binary AA==",
               b"*a", b"&a x", b"'\\n'", b"\"\\u0000\"", b"a" * 300, b"[::1", b"http://[x",
               b"*", b"^1.2", b">=1, <", b"1.2.3-" + b"9" * 30)
YAML_TOKENS = (b"&a ", b"*a", b"[", b"]", b"{", b"}", b": ", b"- ", b"\n  ", b"\n", b"!!str ",
               b"!!int ", b"!!map ", b"'", b'"', b"# ", b"? ", b"<<: *a", b"|\n", b">\n",
               b"---\n", b"...\n", b"\t", b"\x00", b",", b"%YAML 1.1\n", b"!tag ")


class Mutator:
    """Makes inputs from a corpus; the same seed gives the same sequence."""

    def __init__(self, seed: int, *, yaml: bool = False, max_len: int = 1 << 16,
                 dictionary: tuple[bytes, ...] = ()) -> None:
        self.rng = random.Random(seed)
        self.yaml = yaml
        self.max_len = max_len
        self.dictionary = dictionary + (YAML_TOKENS if yaml else ())
        self._ops = [self._flip, self._byte, self._int16, self._int32, self._insert,
                     self._delete, self._duplicate, self._splice, self._truncate,
                     self._dict]
        if yaml:
            self._ops += [self._alias_fanout, self._nest, self._scalar, self._scalar,
                          self._line_dup, self._indent, self._dict]

    def mutate(self, corpus: list[bytes]) -> bytes:
        """One new input: one to four operators applied to a corpus entry."""
        rng = self.rng
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 4)):
            rng.choice(self._ops)(data, corpus)
        return bytes(data[:self.max_len])

    # -- bytes -----------------------------------------------------------------------------
    def _pos(self, data: bytearray, extra: int = 0) -> int:
        return self.rng.randint(0, max(0, len(data) - 1 + extra))

    def _flip(self, data: bytearray, _c: list[bytes]) -> None:
        if data:
            i = self._pos(data)
            data[i] ^= 1 << self.rng.randrange(8)

    def _byte(self, data: bytearray, _c: list[bytes]) -> None:
        if data:
            data[self._pos(data)] = self.rng.choice((*INTERESTING_8, self.rng.randrange(256)))

    def _int16(self, data: bytearray, _c: list[bytes]) -> None:
        if len(data) >= 2:
            i = self.rng.randint(0, len(data) - 2)
            fmt = self.rng.choice(("<H", ">H"))
            data[i:i + 2] = struct.pack(fmt, self.rng.choice(INTERESTING_16))

    def _int32(self, data: bytearray, _c: list[bytes]) -> None:
        if len(data) >= 4:
            i = self.rng.randint(0, len(data) - 4)
            fmt = self.rng.choice(("<I", ">I"))
            data[i:i + 4] = struct.pack(fmt, self.rng.choice(INTERESTING_32))

    def _insert(self, data: bytearray, _c: list[bytes]) -> None:
        n = self.rng.choice((1, 1, 2, 4, 8, 32))
        i = self._pos(data, 1)
        data[i:i] = bytes(self.rng.randrange(256) for _ in range(n))

    def _delete(self, data: bytearray, _c: list[bytes]) -> None:
        if data:
            i = self._pos(data)
            del data[i:i + self.rng.choice((1, 1, 2, 4, 16, 64))]

    def _duplicate(self, data: bytearray, _c: list[bytes]) -> None:
        if data:
            i = self._pos(data)
            chunk = data[i:i + self.rng.choice((1, 4, 16, 64))]
            j = self._pos(data, 1)
            data[j:j] = chunk * self.rng.choice((1, 2, 8))

    def _splice(self, data: bytearray, corpus: list[bytes]) -> None:
        other = self.rng.choice(corpus)
        if other:
            a = self.rng.randint(0, len(other) - 1)
            chunk = other[a:a + self.rng.randint(1, 64)]
            i = self._pos(data, 1)
            data[i:i + self.rng.choice((0, len(chunk)))] = chunk

    def _truncate(self, data: bytearray, _c: list[bytes]) -> None:
        if data:
            del data[self._pos(data):]

    def _dict(self, data: bytearray, _c: list[bytes]) -> None:
        if self.dictionary:
            i = self._pos(data, 1)
            data[i:i] = self.rng.choice(self.dictionary)

    # -- YAML structure --------------------------------------------------------------------
    def _line_start(self, data: bytearray) -> int:
        starts = [0] + [i + 1 for i, b in enumerate(data) if b == 0x0A]
        return self.rng.choice(starts)

    def _alias_fanout(self, data: bytearray, _c: list[bytes]) -> None:
        width, depth = self.rng.randint(2, 12), self.rng.randint(2, 8)
        lines = [b"a0: &a0 [" + b",".join([b"x"] * width) + b"]"]
        for d in range(1, depth):
            lines.append(b"a%d: &a%d [" % (d, d) + b",".join([b"*a%d" % (d - 1)] * width)
                         + b"]")
        i = self._line_start(data)
        data[i:i] = b"\n".join(lines) + b"\n"

    def _nest(self, data: bytearray, _c: list[bytes]) -> None:
        n = self.rng.choice((8, 40, 200, 2000))
        kind = self.rng.choice(((b"[", b"]"), (b"{a: ", b"}"), (b"- ", b"")))
        i = self._pos(data, 1)
        data[i:i] = kind[0] * n + kind[1] * n

    def _scalar(self, data: bytearray, _c: list[bytes]) -> None:
        colons = [i + 2 for i in range(len(data) - 1) if data[i:i + 2] == b": "]
        if not colons:
            return
        i = self.rng.choice(colons)
        end = i
        while end < len(data) and data[end] not in b"\n,}]":
            end += 1
        data[i:end] = self.rng.choice(ODD_SCALARS)

    def _line_dup(self, data: bytearray, _c: list[bytes]) -> None:
        i = self._line_start(data)
        end = data.find(b"\n", i)
        line = data[i:end + 1 if end >= 0 else len(data)]
        j = self._line_start(data)
        data[j:j] = line * self.rng.choice((1, 2, 50))

    def _indent(self, data: bytearray, _c: list[bytes]) -> None:
        i = self._line_start(data)
        if self.rng.random() < 0.5:
            data[i:i] = b" " * self.rng.choice((1, 2, 4))
        else:
            while i < len(data) and data[i] == 0x20:
                del data[i]
