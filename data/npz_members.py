"""An array inside an .npz (zip) archive, located without reading it: where its rows are, and how.

`np.load` on an .npz decompresses or copies a whole member on access. A pool of 20M images is a 61 GB
member, so instead the zip's central directory and the member's .npy header are read (a few KiB):
a stored member (`np.savez`) is a plain array at a known offset in the file and is read in place;
a deflated one (`np.savez_compressed`) can only be decompressed from its start, so it is streamed.
"""
from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header: 30 bytes before name and extra field
_LOCAL_SIGNATURE = b"PK\x03\x04"
_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    header_bytes: int  # from the start of the .npy stream to its first data byte

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class NpzMember:
    """Where an npz member's array lives: `data_offset` in the file (stored) or `header.header_bytes`
    into the decompressed member (deflated)."""

    path: Path
    name: str  # the zip member, e.g. "image.npy"
    compressed: bool
    header: NpyHeader
    data_offset: int  # absolute offset of the first data byte; only meaningful when not compressed


def read_npy_header(stream, where: str) -> NpyHeader:
    """Parse an .npy header from a binary stream positioned at its magic string."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} (only 1.0 and 2.0 hold plain arrays)")
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{where} is not a readable .npy array ({e}); check pool.path or pool.provider, or "
                        "re-save it with np.save / np.savez.") from None
    if dtype.hasobject:
        raise UserError(f"{where} holds Python objects, which rst-mart does not unpickle; re-save the images as "
                        "a uint8 array.")
    return NpyHeader(tuple(shape), dtype, fortran_order, stream.tell())


def npz_keys(archive: zipfile.ZipFile) -> list[str]:
    return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]


def open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path} is not a valid .npz (zip) file ({e}): it is truncated (its zip directory, "
                        "written last, is missing) or not an npz at all; copy or download it again, or check "
                        "pool.path and pool.provider.") from None


def locate_member(path: Path, key: str, archive: zipfile.ZipFile) -> NpzMember:
    """The member `key`.npy of the open `archive` at `path`: header parsed, storage checked, size checked."""
    name = f"{key}.npy"
    info = archive.getinfo(name)
    if info.flag_bits & 0x1:
        raise UserError(f"{path}: member {name} is encrypted; decrypt it and re-save with np.savez.")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        method = _METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
        raise UserError(
            f"{path}: member {name} is compressed with {method}; rst-mart reads npz members that are stored "
            "(np.savez) or deflated (np.savez_compressed). Re-save it: np.savez(out, **np.load(path)), or convert "
            "it to .npy (pool.provider = \"npy\")."
        )
    compressed = info.compress_type == zipfile.ZIP_DEFLATED
    where = f"{path} (member {name})"
    if compressed:
        with archive.open(info) as stream:
            header = read_npy_header(stream, where)
        data_offset = -1
    else:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(_LOCAL_HEADER.size)
            if len(local) < _LOCAL_HEADER.size or local[:4] != _LOCAL_SIGNATURE:
                raise UserError(f"{where}: the zip's local header is damaged; copy or download the file again.")
            *_, name_length, extra_length = _LOCAL_HEADER.unpack(local)
            start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            f.seek(start)
            header = read_npy_header(f, where)
        data_offset = header.header_bytes  # the stream was the file itself: tell() is absolute
        header = NpyHeader(header.shape, header.dtype, header.fortran_order, data_offset - start)
    expected = header.header_bytes + header.data_bytes
    if info.file_size != expected:
        raise UserError(f"{where} is damaged: its .npy header describes {header.shape} {header.dtype} "
                        f"({expected} bytes) but the zip member holds {info.file_size} bytes; copy or download "
                        "the file again.")
    return NpzMember(path, name, compressed, header, data_offset)
