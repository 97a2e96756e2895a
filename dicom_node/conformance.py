"""Check that received C-STORE bytes are a well-formed dataset that matches its request.

:func:`inspect_dataset` walks the element structure itself (tags, VRs, lengths, sequences,
pixel data fragments) without decoding pixel data, so a 50 MB image costs a few hundred element
headers, not a copy. It then lets pydicom decode only the header (everything before Pixel Data).

* bytes that are not a dataset in the negotiated transfer syntax -> :class:`UndecodableDataset`
* UIDs missing, invalid or different from the request, an inconsistent image pixel module ->
  :class:`DatasetMismatch` / :class:`~dicom_node.uids.InvalidUID`
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from .statuses import DatasetMismatch, DatasetTooLarge, UndecodableDataset
from .uids import validate_uid

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
MAX_NESTING = 32

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE",
        b"AS",
        b"AT",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"FD",
        b"FL",
        b"IS",
        b"LO",
        b"LT",
        b"PN",
        b"SH",
        b"SL",
        b"SS",
        b"ST",
        b"TM",
        b"UI",
        b"UL",
        b"US",
    }
)

# First bytes of the first fragment of a frame, per encapsulated transfer syntax family.
_JPEG_SOI = b"\xff\xd8"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "
_JPEG_FAMILY = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
    }
)
_J2K_FAMILY = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
_RLE = "1.2.840.10008.1.2.5"


@dataclass
class PixelDataLayout:
    """Where Pixel Data sits in the received bytes (offsets into the decoded stream)."""

    element_offset: int
    value_offset: int
    length: int | None  # None: undefined length (encapsulated)
    fragments: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), BOT included


@dataclass(frozen=True)
class ReceivedInstance:
    """What the SCP needs to know about a received instance (no patient identifiers)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    header: Dataset  # every element before Pixel Data, for classification


class _Walker:
    """Strict walk over an encoded dataset; raises :class:`UndecodableDataset` on the first flaw."""

    def __init__(self, buf: memoryview, little_endian: bool) -> None:
        self.buf = buf
        e = "<" if little_endian else ">"
        self._tag = struct.Struct(e + "HH")
        self._u16 = struct.Struct(e + "H")
        self._u32 = struct.Struct(e + "L")
        self.pixel: PixelDataLayout | None = None

    def _fail(self, pos: int, what: str) -> UndecodableDataset:
        return UndecodableDataset(f"cannot parse the dataset at byte {pos}: {what}")

    def _header(self, pos: int, end: int) -> tuple[int, int]:
        if pos + 8 > end:
            raise self._fail(pos, f"truncated element header ({end - pos} bytes left, need 8)")
        group, elem = self._tag.unpack_from(self.buf, pos)
        return (group << 16) | elem, pos

    def dataset(self, pos: int, end: int, implicit: bool, depth: int, until_delimiter: bool) -> int:
        if depth > MAX_NESTING:
            raise self._fail(pos, f"sequences nested deeper than {MAX_NESTING} levels")
        buf = self.buf
        while pos < end:
            tag, _ = self._header(pos, end)
            if tag == ITEM_DELIMITER:
                if not until_delimiter:
                    raise self._fail(pos, "item delimiter outside an undefined-length item")
                return pos + 8
            if tag >> 16 == 0xFFFE:
                raise self._fail(
                    pos,
                    f"unexpected item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) inside a dataset",
                )
            if implicit:
                vr = None
                (length,) = self._u32.unpack_from(buf, pos + 4)
                vpos = pos + 8
            else:
                vr = bytes(buf[pos + 4 : pos + 6])
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise self._fail(pos, "truncated element header (need 12 bytes)")
                    (length,) = self._u32.unpack_from(buf, pos + 8)
                    vpos = pos + 12
                elif vr in _SHORT_VRS:
                    (length,) = self._u16.unpack_from(buf, pos + 6)
                    vpos = pos + 8
                else:
                    raise self._fail(
                        pos,
                        f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no valid VR ({vr!r}) "
                        "in an explicit VR transfer syntax",
                    )
            where = f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})"
            if length == UNDEFINED_LENGTH:
                if tag == PIXEL_DATA and depth == 0 and vr in (b"OB", b"OW"):
                    frags, after = self._fragments(vpos, end)
                    self.pixel = PixelDataLayout(pos, vpos, None, frags)
                    pos = after
                elif vr in (None, b"SQ", b"UN"):
                    # PS3.5 6.2.2: UN with undefined length holds implicit VR little endian items
                    pos = self._sequence(vpos, end, implicit or vr == b"UN", depth + 1, None)
                else:
                    raise self._fail(
                        pos, f"{where} has undefined length, not allowed for VR {vr!r}"
                    )
            else:
                if vpos + length > end:
                    raise self._fail(
                        pos,
                        f"{where} declares {length} bytes but only {end - vpos} remain "
                        "(truncated?)",
                    )
                if vr == b"SQ":
                    self._sequence(vpos, end, implicit, depth + 1, vpos + length)
                if tag == PIXEL_DATA and depth == 0:
                    self.pixel = PixelDataLayout(pos, vpos, length)
                pos = vpos + length
        if until_delimiter:
            raise self._fail(pos, "item without its item delimiter (truncated?)")
        return pos

    def _sequence(
        self, pos: int, end: int, implicit: bool, depth: int, defined_end: int | None
    ) -> int:
        limit = end if defined_end is None else defined_end
        while pos < limit:
            tag, _ = self._header(pos, limit)
            (length,) = self._u32.unpack_from(self.buf, pos + 4)
            if tag == SEQUENCE_DELIMITER:
                if defined_end is not None:
                    raise self._fail(pos, "sequence delimiter inside a defined-length sequence")
                return pos + 8
            if tag != ITEM:
                raise self._fail(
                    pos, f"expected a sequence item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})"
                )
            if length == UNDEFINED_LENGTH:
                pos = self.dataset(pos + 8, limit, implicit, depth, until_delimiter=True)
            else:
                if pos + 8 + length > limit:
                    raise self._fail(
                        pos,
                        f"sequence item declares {length} bytes beyond its sequence (truncated?)",
                    )
                self.dataset(pos + 8, pos + 8 + length, implicit, depth, until_delimiter=False)
                pos += 8 + length
        if defined_end is None:
            raise self._fail(pos, "sequence without its sequence delimiter (truncated?)")
        return pos

    def _fragments(self, pos: int, end: int) -> tuple[list[tuple[int, int]], int]:
        frags: list[tuple[int, int]] = []
        while True:
            tag, _ = self._header(pos, end)
            (length,) = self._u32.unpack_from(self.buf, pos + 4)
            if tag == SEQUENCE_DELIMITER:
                return frags, pos + 8
            if tag != ITEM or length == UNDEFINED_LENGTH:
                raise self._fail(pos, "encapsulated Pixel Data: expected a defined-length item")
            if pos + 8 + length > end:
                raise self._fail(
                    pos,
                    f"Pixel Data fragment declares {length} bytes but only {end - pos - 8} "
                    "remain (truncated?)",
                )
            frags.append((pos + 8, length))
            pos += 8 + length


#: Default output cap for :func:`inflate` (the SCP passes ``dicom.max_dataset_mb``).
DEFAULT_MAX_DATASET_BYTES = 256 * 1024 * 1024
_INFLATE_STEP = 4 * 1024 * 1024


def inflate(data: memoryview | bytes, max_bytes: int = DEFAULT_MAX_DATASET_BYTES) -> bytearray:
    """Inflate a Deflated Explicit VR Little Endian dataset, never holding more than
    ``max_bytes`` of output (plus one step): a deflate bomb raises :class:`DatasetTooLarge`
    after ``max_bytes``, not after exhausting memory. Output grows in place (no ``out + flush``
    copy doubling the peak)."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending: memoryview | bytes = data
    try:
        while True:
            room = max_bytes + 1 - len(out)
            piece = d.decompress(pending, min(room, _INFLATE_STEP))
            out += piece
            if len(out) > max_bytes:
                raise DatasetTooLarge(
                    f"the deflated dataset inflates to more than {max_bytes} bytes "
                    "(dicom.max_dataset_mb); refused"
                )
            pending = d.unconsumed_tail
            if not pending:
                if d.eof or not piece:
                    break
        out += d.flush(max(1, max_bytes + 1 - len(out)))
    except zlib.error as exc:
        # zlib's messages describe the stream ("invalid distance too far back"), never its data
        raise UndecodableDataset(f"cannot inflate the deflated dataset: {exc}") from None
    if len(out) > max_bytes:
        raise DatasetTooLarge(
            f"the deflated dataset inflates to more than {max_bytes} bytes (dicom.max_dataset_mb)"
        )
    return out


def _get(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception as exc:  # pydicom raises many types for malformed values
        raise DatasetMismatch(f"{keyword} cannot be read: {type(exc).__name__}") from None


def _positive_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = _get(ds, keyword)
    if value is None or value == "":
        if default is not None:
            return default
        raise DatasetMismatch(f"image pixel module: {keyword} is missing")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise DatasetMismatch(f"image pixel module: {keyword} is not an integer") from None
    if n < 1:
        raise DatasetMismatch(f"image pixel module: {keyword} is {n}, must be at least 1")
    return n


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _get(ds, keyword)
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def _check_pixels(ds: Dataset, layout: PixelDataLayout | None, ts: UID, buf: memoryview) -> None:
    if layout is None:
        raise DatasetMismatch("image pixel module: Pixel Data (7FE0,0010) is missing")
    rows = _positive_int(ds, "Rows")
    cols = _positive_int(ds, "Columns")
    spp = _positive_int(ds, "SamplesPerPixel")
    bits = _positive_int(ds, "BitsAllocated")
    frames = _positive_int(ds, "NumberOfFrames", default=1)
    if bits not in (1, 8, 16, 32, 64):
        raise DatasetMismatch(f"image pixel module: BitsAllocated {bits} is not 1, 8, 16, 32 or 64")
    if spp not in (1, 3, 4):
        raise DatasetMismatch(f"image pixel module: SamplesPerPixel {spp} is not 1, 3 or 4")
    photometric = _text(ds, "PhotometricInterpretation")
    if photometric is None:
        raise DatasetMismatch("image pixel module: PhotometricInterpretation is missing")
    if not ts.is_compressed:
        if layout.length is None:
            raise DatasetMismatch(f"Pixel Data is encapsulated but transfer syntax {ts} is not")
        # YBR_FULL_422 stores two chroma samples per pixel pair: 2 samples per pixel on average
        samples = 2 if photometric == "YBR_FULL_422" and spp == 3 else spp
        expected_bits = rows * cols * samples * bits * frames
        expected = (expected_bits + 7) // 8
        if layout.length not in (expected, expected + (expected % 2)):
            raise DatasetMismatch(
                f"image pixel module: Pixel Data has {layout.length} bytes but Rows {rows} x "
                f"Columns {cols} x SamplesPerPixel {spp} x BitsAllocated {bits} / 8 x frames "
                f"{frames} = {expected}"
            )
        return
    if layout.length is not None:
        raise DatasetMismatch(
            f"Pixel Data is not encapsulated but transfer syntax {ts} ({ts.name}) requires it"
        )
    data_frags = layout.fragments[1:]  # the first item is the Basic Offset Table
    if not data_frags or all(n == 0 for _, n in data_frags):
        raise DatasetMismatch("encapsulated Pixel Data has no data fragments")
    if len(data_frags) < frames:
        raise DatasetMismatch(
            f"encapsulated Pixel Data has {len(data_frags)} fragments for {frames} frames"
        )
    off, n = data_frags[0]
    head = bytes(buf[off : off + min(n, 64)])
    if ts in _JPEG_FAMILY:
        ok, what = head.startswith(_JPEG_SOI), "a JPEG start-of-image marker (FFD8)"
    elif ts in _J2K_FAMILY:
        ok = head.startswith(_J2K_SOC_SIZ) or head.startswith(_JP2_SIGNATURE)
        what = "a JPEG 2000 codestream (FF4F FF51)"
    elif ts == _RLE:
        ok = (
            len(head) >= 8
            and 1 <= struct.unpack_from("<L", head)[0] <= 15
            and struct.unpack_from("<L", head, 4)[0] == 64
        )
        what = "an RLE header (1-15 segments, first at offset 64)"
    else:
        return  # a compressed syntax we do not know how to sniff: accept as received
    if not ok:
        raise DatasetMismatch(
            f"encapsulated Pixel Data does not start with {what} as transfer syntax {ts.name} "
            "requires"
        )


def inspect_dataset(
    data: memoryview | bytes,
    *,
    transfer_syntax: str,
    affected_sop_class_uid: str,
    affected_sop_instance_uid: str,
    require_pixels: bool = True,
    max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES,
) -> ReceivedInstance:
    """Check the encoded dataset of a C-STORE request and return what the SCP records about it.

    ``data`` is the dataset exactly as received (no file meta). The image pixel module is checked
    when the dataset has Pixel Data, and required when ``require_pixels`` (the SCP requires it
    of the image classes it analyses; an SR, a presentation state or a PDF has none). Raises
    :class:`UndecodableDataset`, :class:`DatasetMismatch` or :class:`~dicom_node.uids.InvalidUID`.
    """
    ts = UID(transfer_syntax)
    buf = memoryview(data)
    if ts == DeflatedExplicitVRLittleEndian:
        buf = memoryview(inflate(buf, max_dataset_bytes))
    elif len(buf) > max_dataset_bytes:
        raise DatasetTooLarge(
            f"the dataset has {len(buf)} bytes, more than {max_dataset_bytes} "
            "(dicom.max_dataset_mb)"
        )
    implicit = ts == ImplicitVRLittleEndian
    little = ts != ExplicitVRBigEndian
    if len(buf) == 0:
        raise UndecodableDataset("the dataset is empty")
    walker = _Walker(buf, little)
    walker.dataset(0, len(buf), implicit, 0, until_delimiter=False)
    layout = walker.pixel
    header_end = layout.element_offset if layout is not None else len(buf)
    try:
        ds = read_dataset(BytesIO(bytes(buf[:header_end])), implicit, little)
        ds.set_original_encoding(implicit, little)
    except Exception as exc:
        # never the exception's text: it may quote the element's value (patient data)
        raise UndecodableDataset(
            f"pydicom cannot decode the header: {type(exc).__name__}"
        ) from None

    sop_class = validate_uid(_get(ds, "SOPClassUID"), what="SOPClassUID")
    sop_instance = validate_uid(_get(ds, "SOPInstanceUID"), what="SOPInstanceUID")
    if sop_class != affected_sop_class_uid:
        raise DatasetMismatch(
            f"SOPClassUID {sop_class} in the dataset differs from the request's Affected SOP "
            f"Class UID {affected_sop_class_uid}"
        )
    if sop_instance != affected_sop_instance_uid:
        raise DatasetMismatch(
            f"SOPInstanceUID {sop_instance} in the dataset differs from the request's Affected "
            f"SOP Instance UID {affected_sop_instance_uid}"
        )
    study = validate_uid(_get(ds, "StudyInstanceUID"), what="StudyInstanceUID")
    series = validate_uid(_get(ds, "SeriesInstanceUID"), what="SeriesInstanceUID")
    if layout is not None or require_pixels:
        _check_pixels(ds, layout, ts, buf)
    return ReceivedInstance(
        study_uid=str(study),
        series_uid=str(series),
        sop_instance_uid=str(sop_instance),
        sop_class_uid=str(sop_class),
        transfer_syntax_uid=str(ts),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        header=ds,
    )
