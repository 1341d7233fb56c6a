"""A minimal reader of R's serialization format (XDR, versions 2 and 3) and of R's lazy-load
databases (the data/Rdata.rdx index and data/Rdata.rdb values of an installed R package).

It reads what data sets of text are made of: NULL, character, logical, integer, double and
generic vectors, their attributes (names, class, ...), pairlists and symbols, and references
to symbols read earlier. Anything else (environments, closures, byte code, ALTREP compact
vectors, ...) raises RDataError naming the type, rather than being guessed at.

Values come back as Python objects:

- NULL -> None;
- a vector -> RVector, a list of its elements (str or None for NA in a character vector; bool or
  None in a logical one; int or None in an integer one; float in a double one; any of these in a
  generic vector), its R attributes in `.attributes` (e.g. {"names": RVector(["a", "b"])});
- a pairlist -> a list of (tag or None, value) pairs;
- a symbol -> RSymbol.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass
from typing import Any


class RDataError(ValueError):
    """Bytes that are not R serialization, or that hold something this reader does not support."""


class RVector(list):
    """An R vector: its elements, and its attributes (name -> value)."""

    def __init__(self, values=(), attributes: dict[str, Any] | None = None):
        super().__init__(values)
        self.attributes: dict[str, Any] = attributes or {}

    def names(self) -> list[str | None] | None:
        """The "names" attribute, or None without one."""
        return self.attributes.get("names")


@dataclass(frozen=True)
class RSymbol:
    name: str


# SEXP types (R Internals, "Serialization formats").
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
# Pseudo-types the serializer writes instead of a SEXP.
REFSXP, NILVALUE_SXP = 255, 254
_TYPE_NAMES = {
    3: "closure", 4: "environment", 5: "promise", 6: "language object", 7: "special function",
    8: "builtin function", 15: "complex vector", 17: "dot-dot-dot", 20: "expression vector",
    21: "byte code", 22: "external pointer", 23: "weak reference", 24: "raw vector", 25: "S4 object",
    238: "ALTREP object", 239: "attributed pairlist", 240: "attributed language object",
    241: "base environment", 242: "empty environment", 247: "persistent reference",
    248: "package environment", 249: "namespace", 250: "base namespace", 251: "missing argument",
    252: "unbound value", 253: "global environment",
}  # fmt: skip

NA_INTEGER = -(2**31)
# CHARSXP encoding flags, in the "levels" bits of its header.
_LATIN1, _BYTES = 1 << 2, 1 << 1


def unserialize(data: bytes) -> Any:
    """The value serialized in `data` (XDR format: it starts with b"X\\n"; as saveRDS writes it
    before compression, or as a lazy-load database holds each value after decompression)."""
    return _Reader(data).read_stream()


def read_rds(data: bytes) -> Any:
    """The value in an .rds file's bytes (saveRDS: gzip, bzip2 or xz compressed, or not at all)."""
    for magic, decompress in ((b"\x1f\x8b", gzip.decompress), (b"BZh", bz2.decompress), (b"\xfd7zXZ", lzma.decompress)):
        if data.startswith(magic):
            return unserialize(decompress(data))
    return unserialize(data)


def read_lazy_load_database(index: bytes, database: bytes) -> dict[str, Any]:
    """The objects of an R lazy-load database, by name, in the index's order: `index` the bytes of
    the .rdx file (an .rds of list(variables = list(name = c(offset, length)), references,
    compressed)), `database` those of the .rdb file, where each value is a 4-byte big-endian
    uncompressed length and then a zlib stream (for `compressed` 2 and 3, a type byte and then a
    zlib, bzip2, xz or uncompressed stream; for `compressed` FALSE, the serialization alone)."""
    table = read_rds(index)
    fields = _named(table, "the .rdx index")
    if "variables" not in fields:
        raise RDataError(f"the .rdx index has no 'variables' entry (it has {', '.join(fields) or 'no names'})")
    compression = fields.get("compressed", RVector([True]))
    compression = int(compression[0]) if isinstance(compression, RVector) and compression else 1
    objects = {}
    for name, place in _named(fields["variables"], "the .rdx 'variables' entry").items():
        if not isinstance(place, RVector) or len(place) != 2:
            raise RDataError(f"the .rdx index places {name!r} at {place!r}; expected c(offset, length)")
        offset, length = (int(x) for x in place)
        objects[name] = unserialize(_decompress_value(database[offset : offset + length], compression, name))
    return objects


def _named(value: Any, what: str) -> dict[str, Any]:
    names = value.names() if isinstance(value, RVector) else None
    if names is None or len(names) != len(value):
        raise RDataError(f"{what} is not a named list")
    return dict(zip(names, value))


def _decompress_value(chunk: bytes, compression: int, name: str) -> bytes:
    if compression == 0:  # compress = FALSE: the serialization itself, no length word
        return chunk
    if len(chunk) < 5:
        raise RDataError(f"the .rdb value of {name!r} is cut short ({len(chunk)} bytes)")
    (length,) = struct.unpack(">I", chunk[:4])
    body = chunk[4:]
    if compression in (2, 3):
        kind, body = chunk[4:5], chunk[5:]
        decompress = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}.get(kind)
        if decompress is None:
            raise RDataError(f"the .rdb value of {name!r} has compression type {kind!r}; expected Z, 2, X or 0")
    elif compression == 1:
        decompress = zlib.decompress
    else:
        raise RDataError(f"the .rdx index says compressed={compression}; expected 0 to 3")
    try:
        value = decompress(body)
    except (zlib.error, OSError, lzma.LZMAError) as error:
        raise RDataError(f"the .rdb value of {name!r} does not decompress: {error}") from None
    if len(value) != length:
        raise RDataError(f"the .rdb value of {name!r} is {len(value)} bytes; its header says {length}")
    return value


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.position = 0
        self.references: list[Any] = []

    def read_stream(self) -> Any:
        if self.data[:2] != b"X\n":
            raise RDataError(f"not R serialization in XDR format: starts with {self.data[:2]!r}, expected b'X\\n'")
        self.position = 2
        version = self.integer()
        self.integer(), self.integer()  # the writer's R version, the oldest R that reads it
        if version == 3:
            self.take(self.integer())  # the name of the writer's native encoding
        elif version != 2:
            raise RDataError(f"R serialization version {version}; this reader knows versions 2 and 3")
        return self.item()

    def integer(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.position)
        self.position += 4
        return value

    def length(self) -> int:
        length = self.integer()
        if length == -1:  # a long vector: two more words, upper then lower
            upper, lower = self.integer(), self.integer()
            length = (upper << 32) + (lower & 0xFFFFFFFF)
        return length

    def take(self, size: int) -> bytes:
        if self.position + size > len(self.data):
            raise RDataError(f"R serialization cut short: {size} bytes wanted at offset {self.position} of {len(self.data)}")
        chunk = self.data[self.position : self.position + size]
        self.position += size
        return chunk

    def item(self) -> Any:
        flags = self.integer()
        kind, levels = flags & 0xFF, flags >> 12
        has_attributes, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (NILVALUE_SXP, NILSXP):
            return None
        if kind == REFSXP:
            index = (flags >> 8) or self.integer()
            return self.references[index - 1]
        if kind == SYMSXP:
            symbol = RSymbol(self.item())
            self.references.append(symbol)
            return symbol
        if kind == LISTSXP:
            return self.pairlist(has_attributes, has_tag)
        if kind == CHARSXP:
            return self.string(levels)
        if kind in (LGLSXP, INTSXP):
            length = self.length()
            values = struct.unpack(f">{length}i", self.take(4 * length))
            values = [None if v == NA_INTEGER else (bool(v) if kind == LGLSXP else v) for v in values]
        elif kind == REALSXP:
            length = self.length()
            values = list(struct.unpack(f">{length}d", self.take(8 * length)))
        elif kind in (STRSXP, VECSXP):
            values = [self.item() for _ in range(self.length())]
        else:
            raise RDataError(f"R serialization holds a value of type {_TYPE_NAMES.get(kind, kind)}, which this reader does not support")
        vector = RVector(values)
        if has_attributes:
            vector.attributes = {tag.name if tag else None: value for tag, value in self.item()}
        return vector

    def pairlist(self, has_attributes: bool, has_tag: bool) -> list[tuple[RSymbol | None, Any]]:
        """A pairlist, read iteratively: each cell is [attributes] [tag] CAR, then the CDR's item."""
        cells = []
        while True:
            if has_attributes:
                self.item()  # attributes on a pairlist cell: none that text data needs
            tag = self.item() if has_tag else None
            cells.append((tag, self.item()))
            flags = self.integer()
            kind = flags & 0xFF
            if kind in (NILVALUE_SXP, NILSXP):
                return cells
            if kind != LISTSXP:
                raise RDataError(f"a pairlist ends in a value of type {_TYPE_NAMES.get(kind, kind)}; expected NULL")
            has_attributes, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def string(self, levels: int) -> str | None:
        size = self.integer()
        if size == -1:
            return None  # NA_character_
        raw = self.take(size)
        if levels & _BYTES:
            return raw.decode("latin-1")  # R's "bytes" encoding: no declared encoding; keep every byte
        return raw.decode("latin-1" if levels & _LATIN1 else "utf-8")
