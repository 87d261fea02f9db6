"""Image files cut short or damaged, found before SimpleITK reads them.

SimpleITK reads a NIfTI file (.nii or .nii.gz) that was cut short with the missing voxels set to
zero, a gzip-encoded NRRD or a compressed MetaImage whose stream is damaged with wrong voxels, and
a truncated JPEG filled with grey, all without an error. A half-copied file would then be
segmented or registered as if it were whole. So before reading, `check_image_file`:

- streams every compressed payload to its end (the whole file for .nii.gz; the data after the
  header for gzip NRRD and compressed MetaImage), which checks its end-of-stream marker and its
  checksum (CRC-32 for gzip, Adler-32 for zlib);
- compares the bytes there are with the bytes the header announces (size x components x bytes per
  component, from SimpleITK's own reading of the header);
- requires a JPEG's end-of-image marker after its last scan.

Other formats (PNG, DICOM, ...) already fail loudly in SimpleITK when damaged.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepnav.errors import InputError

CHUNK = 1 << 20  # bytes per read while streaming; bounds memory whatever the file's size


class _Damaged(Exception):
    """What is wrong with the file, in words."""


def check_image_file(path: str | Path, what: str = "image") -> None:
    """InputError (one line) when the image file is shorter than its header says or its compressed
    data is damaged; nothing when it is whole or of a kind checked elsewhere."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(4)
        if head[:2] == b"\x1f\x8b":  # the whole file is gzip (.nii.gz)
            with gzip.open(path, "rb") as f:
                _check_nifti(path, f.read(CHUNK), lambda start: start + _stream_length(f))
        elif head[:3] == b"\xff\xd8\xff":
            _check_jpeg(path)
        elif head == b"NRRD":
            _check_nrrd(path)
        elif path.suffix.lower() in (".mha", ".mhd"):
            _check_metaimage(path)
        elif path.suffix.lower() == ".nii":
            with path.open("rb") as f:
                _check_nifti(path, f.read(CHUNK), lambda _: path.stat().st_size)
    except _Damaged as exc:
        raise InputError(f"{what} {path} is truncated or corrupt: {exc}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{what} {path} is truncated or corrupt: its compressed data is damaged ({exc})") from None


def _stream_length(stream) -> int:
    """Read a (decompressing) stream to its end; its length. Errors of the stream propagate."""
    n = 0
    while chunk := stream.read(CHUNK):
        n += len(chunk)
    return n


def _zlib_length(f) -> int:
    """Inflate the zlib stream that starts at f's position to its end (checking its Adler-32);
    its inflated length."""
    inflater, n = zlib.decompressobj(), 0
    while not inflater.eof:
        data = inflater.unconsumed_tail or f.read(CHUNK)
        if not data:
            raise _Damaged("its compressed data ends before its end-of-stream marker")
        n += len(inflater.decompress(data, CHUNK))
    return n


def _payload_bytes(path: Path) -> int:
    """Bytes of voxel data the header announces: voxels x components x bytes per component."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    one = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    return int(np.prod(reader.GetSize(), dtype=np.int64)) * one.GetNumberOfComponentsPerPixel() * one.GetSizeOfPixelComponent()


def _require(available: int, needed: int) -> None:
    if available < needed:
        raise _Damaged(f"it holds {available} bytes of voxel data where its header announces {needed}")


def _check_nifti(path: Path, head: bytes, total_length) -> None:
    """A single-file NIfTI-1/2: the voxels start at vox_offset and must all be there.
    total_length(len(head)) gives the file's (inflated) length, streaming the rest of a .nii.gz."""
    length = total_length(len(head))
    offset = None
    for endian in "<>":  # the header's size, 348 or 540, tells the byte order
        if len(head) >= 348 and struct.unpack_from(endian + "i", head)[0] == 348 and head[344:347] == b"n+1":
            offset = int(struct.unpack_from(endian + "f", head, 108)[0])
        elif len(head) >= 540 and struct.unpack_from(endian + "i", head)[0] == 540 and head[4:7] == b"n+2":
            offset = struct.unpack_from(endian + "q", head, 168)[0]
    if offset is None:
        return  # not a single-file NIfTI (or not even a whole header): SimpleITK's reader decides
    _require(length - offset, _payload_bytes(path))


def _text_header(path: Path, end_of_header) -> tuple[list[str], int]:
    """The header's lines up to the line end_of_header(line) accepts (or the end of a detached
    header), and the byte offset after them."""
    lines, offset = [], 0
    with path.open("rb") as f:
        for raw in f:
            offset += len(raw)
            line = raw.decode("latin-1").rstrip("\r\n")
            lines.append(line)
            if end_of_header(line) or offset > CHUNK:
                break
    return lines, offset


def _data_source(path: Path, name: str | None, offset: int) -> tuple[Path, int]:
    """Where the voxels are: after the header (attached) or in a file named relative to it."""
    return (path, offset) if name is None else (path.parent / name, 0)


def _check_nrrd(path: Path) -> None:
    """A NRRD (attached or detached data): gzip data streamed to its end; raw data long enough."""
    lines, offset = _text_header(path, lambda line: line == "")
    fields = {k.strip().lower(): v.strip() for k, sep, v in (line.partition(":") for line in lines[1:]) if sep}
    data_file = fields.get("data file") or fields.get("datafile")
    if (data_file and (" " in data_file or data_file.startswith("LIST"))) or "line skip" in fields or "byte skip" in fields:
        return  # several data files or skipped bytes: SimpleITK's reader decides
    source, start = _data_source(path, data_file, offset)
    if not source.is_file():
        return  # SimpleITK says the data file is missing
    encoding = fields.get("encoding", "raw")
    if encoding in ("gzip", "gz"):
        with source.open("rb") as f:
            f.seek(start)
            with gzip.GzipFile(fileobj=f) as stream:
                _require(_stream_length(stream), _payload_bytes(path))
    elif encoding == "raw":
        _require(source.stat().st_size - start, _payload_bytes(path))


def _check_metaimage(path: Path) -> None:
    """A MetaImage (.mha, or .mhd and its data file): compressed data inflated to its end; raw data
    long enough. SimpleITK notices a short file, but says "No such file or directory"."""
    lines, offset = _text_header(path, lambda line: line.replace(" ", "").startswith("ElementDataFile="))
    fields = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines)}
    data_file = fields.get("ElementDataFile")
    if data_file is None:
        return  # no data named: SimpleITK's reader says so
    if data_file == "LIST" or "%" in data_file or "HeaderSize" in fields:
        return  # several data files or skipped bytes: SimpleITK's reader decides
    source, start = _data_source(path, None if data_file == "LOCAL" else data_file, offset)
    if not source.is_file():
        return
    with source.open("rb") as f:
        f.seek(start)
        compressed = fields.get("CompressedData", "False").lower() == "true"
        available = _zlib_length(f) if compressed else source.stat().st_size - start
    _require(available, _payload_bytes(path))


def _check_jpeg(path: Path) -> None:
    """libjpeg fills a truncated JPEG with grey and only warns: the end-of-image marker must follow
    the last scan (0xFF bytes inside a scan are always escaped, so the markers cannot be faked)."""
    data = path.read_bytes()
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise _Damaged("it ends inside its image data (no end-of-image marker)")
