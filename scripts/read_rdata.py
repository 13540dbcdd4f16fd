#!/usr/bin/env python3
"""Read R lazy-load databases (Rdata.rdx / Rdata.rdb) without R.

Standard library only. Used by scripts/fetch_assets.sh to turn the Debian
package r-cran-janeaustenr into plain-text novels.

Format notes (checked against janeaustenr 1.0.0 as packaged by Debian):
  * <name>.rdx is an R serialization (XDR, version 2 or 3) of
    list(variables = list(<obj> = c(offset, length), ...), references = ...,
    compressed = TRUE). It is gzip-compressed on disk (saveRDS), not a bare
    zlib stream; both are accepted.
  * <name>.rdb holds one blob per object at [offset, offset + length). Each
    blob is a 4-byte big-endian *uncompressed* length followed by a zlib
    stream (R's compression type 1). Types 2 and 3 add a fifth byte
    ('Z' zlib, '2' bzip2, 'X' xz, '0' none) after the length; both handled.
  * The decompressed blob is an ordinary R serialization of the object.

Usage:
  read_rdata.py list  DATA_DIR/Rdata.rdx          # object names, types, lengths
  read_rdata.py austen DATA_DIR OUT_DIR            # write Austen novels + splits
"""

import bz2
import gzip
import lzma
import math
import os
import struct
import sys
import zlib

# SEXP types
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP = 7, 8, 9, 10
INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP, ANYSXP = 13, 14, 15, 16, 17, 18
VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = (
    19, 20, 21, 22, 23, 24, 25)
# Pseudo-SEXP types used only by serialization
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
PERSISTSXP, CLASSREFSXP, GENERICREFSXP, BCREPDEF = 247, 246, 245, 244
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP = 242, 241, 240, 239
ALTREP_SXP = 238

NA_INTEGER = -(2 ** 31)
# CHARSXP encoding flags (in the "levels" bits)
LATIN1_MASK, UTF8_MASK, BYTES_MASK, ASCII_MASK = 1 << 2, 1 << 3, 1 << 1, 1 << 6


class RError(Exception):
    pass


class RObject:
    """A decoded R value: `type` (SEXP number), `value`, `attributes` (dict)."""

    __slots__ = ("type", "value", "attributes")

    def __init__(self, sexptype, value=None, attributes=None):
        self.type = sexptype
        self.value = value
        self.attributes = attributes or {}

    def __repr__(self):
        v = self.value
        if isinstance(v, list) and len(v) > 6:
            v = "[%d items]" % len(v)
        return "RObject(type=%d, value=%r, attrs=%r)" % (
            self.type, v, list(self.attributes))

    def names(self):
        n = self.attributes.get("names")
        return n.value if n is not None else None


class Unserializer:
    def __init__(self, data):
        self.buf = data
        self.pos = 0
        self.refs = []
        self.native_encoding = None

    # -- primitive readers (XDR = big-endian) -------------------------------
    def _take(self, n):
        if self.pos + n > len(self.buf):
            raise RError("truncated serialization at byte %d" % self.pos)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def int(self):
        return struct.unpack(">i", self._take(4))[0]

    def length(self):
        n = self.int()
        if n == -1:  # long vector: two more ints, upper then lower 32 bits
            hi, lo = struct.unpack(">II", self._take(8))
            n = (hi << 32) | lo
        return n

    def ints(self, n):
        return list(struct.unpack(">%di" % n, self._take(4 * n)))

    def doubles(self, n):
        return list(struct.unpack(">%dd" % n, self._take(8 * n)))

    # -- header -------------------------------------------------------------
    def header(self):
        fmt = self._take(2)
        if fmt == b"A\n":
            raise RError("ASCII serialization is not supported")
        if fmt == b"B\n":
            raise RError("native binary serialization is not supported")
        if fmt != b"X\n":
            raise RError("not an XDR R serialization (magic %r)" % fmt)
        version = self.int()
        self.int()  # R version that wrote it
        self.int()  # minimal R version to read it
        if version == 3:
            n = self.int()
            self.native_encoding = self._take(n).decode("ascii", "replace")
        elif version != 2:
            raise RError("unsupported serialization version %d" % version)
        return version

    def read(self):
        self.header()
        return self.item()

    # -- items --------------------------------------------------------------
    def _string_vec(self):
        if self.int() != 0:
            raise RError("bad string vector header")
        n = self.int()
        return [self.item() for _ in range(n)]

    def _attributes(self):
        """Read a pairlist of attributes into a dict keyed by tag name."""
        pl = self.item()
        out = {}
        while pl is not None and isinstance(pl, RObject) and pl.type == LISTSXP:
            car, tag, cdr = pl.value
            name = tag.value if isinstance(tag, RObject) else str(tag)
            out[name] = car
            pl = cdr
        return out

    def _charsxp(self, levels):
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self._take(n)
        if levels & LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & BYTES_MASK:
            return raw.decode("latin-1")  # arbitrary bytes: keep 1:1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if t == NILVALUE_SXP:
            return None
        if t in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP,
                 MISSINGARG_SXP, BASENAMESPACE_SXP):
            return RObject(t)
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t == PERSISTSXP:
            obj = RObject(t, self._string_vec())
            self.refs.append(obj)
            return obj
        if t == SYMSXP:
            obj = RObject(SYMSXP)
            self.refs.append(obj)  # registered before the name is read
            name = self.item()
            obj.value = name
            return obj
        if t in (PACKAGESXP, NAMESPACESXP):
            obj = RObject(t, self._string_vec())
            self.refs.append(obj)
            return obj
        if t == ENVSXP:
            self.int()  # locked
            obj = RObject(ENVSXP)
            self.refs.append(obj)
            enclos = self.item()
            frame = self.item()
            hashtab = self.item()
            attrs = self.item()
            obj.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            obj.attributes = {"_raw": attrs} if attrs is not None else {}
            return obj
        if t in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP,
                 ATTRLISTSXP):
            attrs = self._attributes() if has_attr else {}
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return RObject(LISTSXP if t == ATTRLISTSXP else t,
                           [car, tag, cdr], attrs)
        if t in (SPECIALSXP, BUILTINSXP):
            n = self.int()
            return RObject(t, self._take(n).decode("ascii", "replace"))
        if t == CHARSXP:
            return self._charsxp(levels)
        if t == EXTPTRSXP:
            obj = RObject(t)
            self.refs.append(obj)
            obj.value = [self.item(), self.item()]  # prot, tag
        elif t == WEAKREFSXP:
            obj = RObject(t)
            self.refs.append(obj)
        elif t == ALTREP_SXP:
            info = self.item()
            state = self.item()
            attr = self.item()
            obj = self._altrep(info, state)
            if attr is not None:
                a = {}
                pl = attr
                while isinstance(pl, RObject) and pl.type == LISTSXP:
                    car, tag, cdr = pl.value
                    a[tag.value if isinstance(tag, RObject) else str(tag)] = car
                    pl = cdr
                obj.attributes = a
            return obj
        elif t in (LGLSXP, INTSXP):
            n = self.length()
            vals = self.ints(n)
            vals = [None if v == NA_INTEGER else v for v in vals]
            if t == LGLSXP:
                vals = [None if v is None else bool(v) for v in vals]
            obj = RObject(t, vals)
        elif t == REALSXP:
            obj = RObject(t, self.doubles(self.length()))
        elif t == CPLXSXP:
            n = self.length()
            d = self.doubles(2 * n)
            obj = RObject(t, [complex(d[2 * i], d[2 * i + 1]) for i in range(n)])
        elif t == STRSXP:
            n = self.length()
            vals = []
            for _ in range(n):
                f = self.int()
                if f & 0xFF != CHARSXP:
                    raise RError("STRSXP element is not a CHARSXP (type %d)"
                                 % (f & 0xFF))
                vals.append(self._charsxp(f >> 12))
            obj = RObject(t, vals)
        elif t in (VECSXP, EXPRSXP):
            n = self.length()
            obj = RObject(t, [self.item() for _ in range(n)])
        elif t == RAWSXP:
            obj = RObject(t, self._take(self.length()))
        elif t == S4SXP:
            obj = RObject(t)
        elif t == BCODESXP:
            raise RError("byte code objects are not supported")
        else:
            raise RError("unsupported SEXP type %d at byte %d" % (t, self.pos))
        if has_attr:
            obj.attributes = self._attributes()
        return obj

    def _altrep(self, info, state):
        # info is a pairlist (class symbol, package symbol, type int)
        cls = info.value[0].value if isinstance(info, RObject) else "?"
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state.value[:3]
            n = int(n)
            t = INTSXP if cls == "compact_intseq" else REALSXP
            conv = int if t == INTSXP else float
            return RObject(t, [conv(start + i * step) for i in range(n)])
        if cls.startswith("wrap_"):
            return state.value[0]
        if cls == "deferred_string":
            arg = state.value[0]
            return RObject(STRSXP, [None if v is None else
                                    (str(v) if not isinstance(v, float) or
                                     not math.isfinite(v) or v != int(v)
                                     else str(int(v)))
                                    for v in arg.value])
        raise RError("unsupported ALTREP class %r" % cls)


def unserialize(data):
    return Unserializer(data).read()


def _decompress(raw):
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:2] in (b"BZ",):
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    if raw[:1] == b"\x78":
        return zlib.decompress(raw)
    return raw  # uncompressed


def _rdb_blob(blob):
    """Decode one .rdb entry: 4-byte BE uncompressed length + payload."""
    (ulen,) = struct.unpack(">I", blob[:4])
    kind = blob[4:5]
    if kind == b"Z":
        out = zlib.decompress(blob[5:])
    elif kind == b"2":
        out = bz2.decompress(blob[5:])
    elif kind == b"X":
        out = lzma.decompress(blob[5:], format=lzma.FORMAT_XZ)
    elif kind == b"0":
        out = blob[5:]
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != ulen:
        raise RError("rdb entry length mismatch: header %d, got %d"
                     % (ulen, len(out)))
    return out


def read_lazyload_db(rdx_path):
    """Return {name: RObject} for every variable in an R lazy-load database."""
    base = rdx_path[:-4] if rdx_path.endswith(".rdx") else rdx_path
    with open(base + ".rdx", "rb") as f:
        index = unserialize(_decompress(f.read()))
    with open(base + ".rdb", "rb") as f:
        rdb = f.read()
    top = dict(zip(index.names(), index.value))
    variables = top["variables"]
    out = {}
    for name, loc in zip(variables.names(), variables.value):
        offset, length = int(loc.value[0]), int(loc.value[1])
        blob = rdb[offset:offset + length]
        if len(blob) != length:
            raise RError("rdb entry %s runs past end of file" % name)
        out[name] = unserialize(_rdb_blob(blob))
    return out


# ---------------------------------------------------------------------------
# janeaustenr

# R object name -> (order in austen_books(), output stem, title)
AUSTEN = [
    ("sensesensibility", "Sense & Sensibility"),
    ("prideprejudice", "Pride & Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
]
VALID_FRACTION = 0.05


def _write_lines(path, lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
    os.replace(tmp, path)


def build_austen(data_dir, out_dir):
    objs = read_lazyload_db(os.path.join(data_dir, "Rdata.rdx"))
    missing = [n for n, _ in AUSTEN if n not in objs]
    if missing:
        raise RError("objects missing from Rdata: %s (found %s)"
                     % (missing, sorted(objs)))
    os.makedirs(out_dir, exist_ok=True)
    train, valid = [], []
    total = n_na = 0
    print("  %-18s %8s %8s %8s %9s" % ("novel", "lines", "train", "valid",
                                       "words"))
    for name, title in AUSTEN:
        obj = objs[name]
        if obj.type != STRSXP:
            raise RError("%s is not a character vector (type %d)"
                         % (name, obj.type))
        lines = obj.value
        n_na += sum(1 for x in lines if x is None)
        lines = ["" if x is None else x for x in lines]
        for x in lines:
            if "\n" in x or "\r" in x:
                raise RError("%s: a line contains a newline" % name)
        n = len(lines)
        n_valid = int(math.ceil(n * VALID_FRACTION))
        cut = n - n_valid
        train.extend(lines[:cut])
        valid.extend(lines[cut:])
        _write_lines(os.path.join(out_dir, name + ".txt"), lines)
        words = sum(len(x.split()) for x in lines)
        total += n
        print("  %-18s %8d %8d %8d %9d  (%s)" % (name + ".txt", n, cut,
                                                 n_valid, words, title))
    _write_lines(os.path.join(out_dir, "valid.txt"), valid)
    _write_lines(os.path.join(out_dir, "train.txt"), train)  # written last
    print("  total lines %d (train.txt %d, valid.txt %d)%s"
          % (total, len(train), len(valid),
             "; %d NA lines written as empty" % n_na if n_na else ""))
    return total


def main(argv):
    if len(argv) == 3 and argv[1] == "list":
        for name, obj in read_lazyload_db(argv[2]).items():
            n = len(obj.value) if isinstance(obj.value, list) else "-"
            print("%s\ttype=%d\tlength=%s" % (name, obj.type, n))
        return 0
    if len(argv) == 4 and argv[1] == "austen":
        build_austen(argv[2], argv[3])
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
