"""Media helpers for the evserver tools: sample sources, Annex-B writing, decoding checks.

No networking here.  Sources are iterators of :class:`Sample` (one access unit
each) that never sleep: the tools pace them on the reactor using ``pts_us``.

* :class:`SyntheticSource`: opaque payloads at a given bitrate, almost free per sample.
* :class:`TestPatternSource`: real H.264 (libx264) of a moving test pattern,
  encoded once per parameter set, cached at module level and looped.
* :class:`FileSource`: H.264 from a video file (Annex-B, SPS/PPS on every
  keyframe), transcoded to H.264 when needed.
* :class:`AnnexBWriter`, :class:`H264Checker`, :func:`decode_file`: write and
  verify received video.
* :func:`make_test_video_file`: a small MP4 for tests.

For H.264 every sample with ``keyframe=True`` is an IDR access unit that carries
SPS and PPS in-band, so a decoder can start at any keyframe.
"""

from __future__ import annotations

import enum
import math
import os
import threading
from collections import deque
from collections.abc import Generator, Iterator
from fractions import Fraction
from types import TracebackType
from typing import IO, Any, Protocol, runtime_checkable

import attrs
import av
import av.bitstream
import av.error
import av.video.frame
import numpy as np
import numpy.typing as npt

__all__ = [
    "NAL_IDR",
    "NAL_PPS",
    "NAL_SPS",
    "AnnexBWriter",
    "Codec",
    "FileSource",
    "H264Checker",
    "MediaError",
    "MediaSource",
    "Sample",
    "SyntheticSource",
    "TestPatternSource",
    "decode_file",
    "encoded_test_pattern",
    "is_self_contained_idr",
    "make_test_video_file",
    "nal_unit_types",
    "split_nal_units",
]

#: H.264 NAL unit types used here.
NAL_IDR = 5
NAL_SPS = 7
NAL_PPS = 8
_NAL_AUD = 9
_START_CODE = b"\x00\x00\x00\x01"


class MediaError(Exception):
    """A media file or stream cannot be used (missing, unreadable, no video, ...)."""


class Codec(enum.IntEnum):
    """Codec ids as carried on the wire."""

    #: H.264 Annex-B byte stream, one access unit per sample.
    H264 = 1
    #: Synthetic test payload; not decodable.
    OPAQUE = 255


@attrs.frozen
class Sample:
    """One access unit.  ``pts_us`` is the presentation time in microseconds."""

    pts_us: int
    keyframe: bool
    codec: Codec
    data: bytes


@runtime_checkable
class MediaSource(Protocol):
    """What the tools rely on: an iterator of samples with a frame rate."""

    fps: float

    def __iter__(self) -> Iterator[Sample]: ...

    def __next__(self) -> Sample: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------
# Annex-B helpers


def split_nal_units(data: bytes) -> list[bytes]:
    """Split an Annex-B byte string into NAL units (start codes and trailing zeros removed)."""
    units: list[bytes] = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        start = i + 3
        j = data.find(b"\x00\x00\x01", start)
        unit = data[start : len(data) if j < 0 else j].rstrip(b"\x00")
        if unit:
            units.append(unit)
        i = j
    return units


def nal_unit_types(data: bytes) -> list[int]:
    """The NAL unit types (``nal_unit_type``, 0..31) of an Annex-B access unit, in order."""
    return [unit[0] & 0x1F for unit in split_nal_units(data)]


def is_self_contained_idr(data: bytes) -> bool:
    """True if the access unit has SPS and PPS before its first IDR slice."""
    types = nal_unit_types(data)
    if NAL_IDR not in types:
        return False
    head = types[: types.index(NAL_IDR)]
    return NAL_SPS in head and NAL_PPS in head


def _parameter_sets_from_extradata(extradata: bytes | None) -> list[bytes]:
    """SPS and PPS NAL units from avcC or Annex-B extradata (empty list if none)."""
    if not extradata:
        return []
    if extradata.startswith(b"\x00\x00\x01") or extradata.startswith(_START_CODE):
        return [u for u in split_nal_units(extradata) if u[0] & 0x1F in (NAL_SPS, NAL_PPS)]
    units: list[bytes] = []
    if extradata[0] != 1 or len(extradata) < 7:
        return units
    pos = 5
    try:
        for count_mask in (0x1F, 0xFF):  # SPS count (5 bits), then PPS count (8 bits)
            count = extradata[pos] & count_mask
            pos += 1
            for _ in range(count):
                size = int.from_bytes(extradata[pos : pos + 2], "big")
                unit = extradata[pos + 2 : pos + 2 + size]
                if len(unit) != size or not unit:
                    return units
                units.append(unit)
                pos += 2 + size
    except IndexError:
        pass
    return units


class _ParameterSetKeeper:
    """Remembers the latest SPS/PPS and puts them in front of IDRs that lack them."""

    def __init__(self, initial: list[bytes]) -> None:
        self._sets: dict[int, bytes] = {}
        for unit in initial:
            self._remember(unit)

    def _remember(self, unit: bytes) -> None:
        kind = unit[0] & 0x1F
        if kind == NAL_PPS:
            # Key PPS by their first bytes: a stream may carry several PPS ids.
            self._sets[(kind << 16) | int.from_bytes(unit[1:3], "big")] = unit
        elif kind == NAL_SPS:
            self._sets = {k: v for k, v in self._sets.items() if k >> 16 != NAL_SPS}
            self._sets[kind << 16] = unit

    def process(self, data: bytes, keyframe: bool) -> tuple[bytes, bool]:
        """Return (data, keyframe) with SPS/PPS inserted before the IDR if missing.

        ``keyframe`` is kept only for access units that contain an IDR slice.
        """
        units = split_nal_units(data)
        types = [u[0] & 0x1F for u in units]
        for unit, kind in zip(units, types, strict=True):
            if kind in (NAL_SPS, NAL_PPS):
                self._remember(unit)
        if not keyframe:
            return data, False
        if NAL_IDR not in types:
            return data, False
        head = types[: types.index(NAL_IDR)]
        if NAL_SPS in head and NAL_PPS in head:
            return data, True
        sps = [u for k, u in self._sets.items() if k >> 16 == NAL_SPS]
        pps = [u for k, u in self._sets.items() if k >> 16 == NAL_PPS]
        if not sps or not pps:
            raise MediaError("H.264 keyframe without SPS/PPS, and none known from the stream")
        keep = [u for u, k in zip(units, types, strict=True) if k not in (NAL_SPS, NAL_PPS)]
        lead: list[bytes] = []
        if keep and keep[0][0] & 0x1F == _NAL_AUD:
            lead = [keep.pop(0)]
        out = b"".join(_START_CODE + u for u in (*lead, *sps, *pps, *keep))
        return out, True


# --------------------------------------------------------------------------
# Synthetic source


class SyntheticSource:
    """Infinite OPAQUE samples whose average size matches ``bitrate_bps``.

    Keyframes (every ``keyframe_interval`` samples, starting with the first)
    are 5 times larger than delta frames.  Payloads are a few precomputed
    random buffers, reused, so a sample costs one ``Sample`` construction.
    """

    KEYFRAME_WEIGHT = 5

    def __init__(self, bitrate_bps: int, fps: float, keyframe_interval: int, seed: int = 0) -> None:
        if bitrate_bps <= 0 or fps <= 0 or keyframe_interval < 1:
            raise ValueError("bitrate_bps and fps must be positive and keyframe_interval >= 1")
        self.bitrate_bps = bitrate_bps
        self.fps = float(fps)
        self.keyframe_interval = keyframe_interval
        self.seed = seed
        weight_per_gop = self.KEYFRAME_WEIGHT + keyframe_interval - 1
        bytes_per_gop = bitrate_bps / 8.0 * keyframe_interval / self.fps
        self._delta_bytes = bytes_per_gop / weight_per_gop
        self._key_bytes = self._delta_bytes * self.KEYFRAME_WEIGHT
        # The buffer holds a seeded random block, sliced to each needed size once.
        self._pool = (
            np.random.default_rng(seed)
            .integers(0, 256, size=math.ceil(self._key_bytes) + 1, dtype=np.uint8)
            .tobytes()
        )
        self._buffers: dict[int, bytes] = {}
        self._index = 0
        self._owed = 0.0  # fractional bytes carried so the average is exact
        self._interval_us = 1_000_000.0 / self.fps

    def _buffer(self, size: int) -> bytes:
        buf = self._buffers.get(size)
        if buf is None:
            buf = self._buffers[size] = self._pool[:size]
        return buf

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        index = self._index
        self._index = index + 1
        keyframe = index % self.keyframe_interval == 0
        want = (self._key_bytes if keyframe else self._delta_bytes) + self._owed
        size = max(1, int(want))
        self._owed = want - size
        return Sample(round(index * self._interval_us), keyframe, Codec.OPAQUE, self._buffer(size))

    def close(self) -> None:
        """Nothing to release."""


# --------------------------------------------------------------------------
# Test pattern and H.264 encoding

# Colour bars (75 %): white, yellow, cyan, green, magenta, red, blue.
_BARS_RGB = np.array(
    [
        [191, 191, 191],
        [191, 191, 0],
        [0, 191, 191],
        [0, 191, 0],
        [191, 0, 191],
        [191, 0, 0],
        [0, 0, 191],
    ],
    dtype=np.uint8,
)
_COUNTER_BITS = 16


def _check_size(width: int, height: int) -> None:
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and >= 16, got {width}x{height}")


class _PatternPainter:
    """Paints yuv420p frames of the test pattern.

    Colour bars with a bouncing white box on the upper part; below, a static
    noise texture (makes keyframes larger than delta frames, as in real video)
    beside a patch of "snow" that changes every frame (so the encoder has
    real work and the bitrate target is reached); a 16-bit binary frame
    counter at the bottom.  Deterministic: frame ``n`` is always the same.
    """

    def __init__(self, width: int, height: int) -> None:
        _check_size(width, height)
        self.width, self.height = width, height
        columns = np.minimum(np.arange(width) * len(_BARS_RGB) // width, len(_BARS_RGB) - 1)
        rgb = np.ascontiguousarray(np.broadcast_to(_BARS_RGB[columns], (height, width, 3)))
        planar = (
            av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()
        )
        flat = planar.reshape(-1)
        luma, chroma = width * height, (width // 2) * (height // 2)
        self._y: npt.NDArray[np.uint8] = flat[:luma].reshape(height, width).astype(np.uint8)
        self._u: npt.NDArray[np.uint8] = (
            flat[luma : luma + chroma].reshape(height // 2, width // 2).astype(np.uint8)
        )
        self._v: npt.NDArray[np.uint8] = (
            flat[luma + chroma :].reshape(height // 2, width // 2).astype(np.uint8)
        )
        self._bit = max(2, (width // (_COUNTER_BITS + 2)) & ~1)
        self._counter_top = height - 2 * self._bit
        self._bars_bottom = (height * 3 // 5) & ~1
        self._box = max(2, (min(width, self._bars_bottom) // 4) & ~1)
        # Lower band: static texture on the left half, snow on the right half.
        band = slice(self._bars_bottom, self._counter_top)
        self._snow_shape = (self._counter_top - self._bars_bottom, width - width // 2)
        texture = np.random.default_rng(0).integers(
            16, 236, (self._counter_top - self._bars_bottom, width // 2)
        )
        self._y[band, : width // 2] = texture.astype(np.uint8)
        self._u[self._bars_bottom // 2 :, :] = 128
        self._v[self._bars_bottom // 2 :, :] = 128

    @staticmethod
    def _bounce(step: int, span: int) -> int:
        """Triangle wave over 0..span, on even positions."""
        if span <= 0:
            return 0
        pos = step % (2 * span)
        return (pos if pos <= span else 2 * span - pos) & ~1

    def frame(self, index: int) -> av.VideoFrame:
        y, u, v = self._y.copy(), self._u.copy(), self._v.copy()
        box = self._box
        x0 = self._bounce(index * 4, self.width - box)
        y0 = self._bounce(index * 3, self._bars_bottom - box)
        y[y0 : y0 + box, x0 : x0 + box] = 235
        u[y0 // 2 : (y0 + box) // 2, x0 // 2 : (x0 + box) // 2] = 128
        v[y0 // 2 : (y0 + box) // 2, x0 // 2 : (x0 + box) // 2] = 128
        snow = np.random.default_rng(index + 1).integers(16, 236, self._snow_shape, dtype=np.uint8)
        y[self._bars_bottom : self._counter_top, self.width // 2 :] = snow
        bit, top = self._bit, self._counter_top
        y[top:, :] = 16
        for n in range(_COUNTER_BITS):
            left = bit + n * bit
            if left + bit > self.width:
                break
            if (index >> n) & 1:
                y[top : top + bit, left : left + bit] = 235
        flat: npt.NDArray[np.uint8] = np.concatenate((y.reshape(-1), u.reshape(-1), v.reshape(-1)))
        frame = av.VideoFrame.from_ndarray(
            flat.reshape(self.height * 3 // 2, self.width), format="yuv420p"
        )
        frame.pts = index
        return frame


def _rate(fps: float) -> Fraction:
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return Fraction(fps).limit_denominator(1001)


def _x264_encoder(
    width: int, height: int, fps: float, keyframe_interval: int, bitrate_bps: int
) -> Any:
    """An opened libx264 context: Annex-B, IDR every ``keyframe_interval``, SPS/PPS on each IDR."""
    if keyframe_interval < 1 or bitrate_bps <= 0:
        raise ValueError("keyframe_interval must be >= 1 and bitrate_bps positive")
    rate = _rate(fps)
    kbps = max(1, round(bitrate_bps / 1000))
    ctx: Any = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.framerate = rate
    ctx.time_base = 1 / rate
    ctx.bit_rate = bitrate_bps
    ctx.gop_size = keyframe_interval
    ctx.max_b_frames = 0
    ctx.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",
        # scenecut=0: keyframes only at the fixed interval; no B-frames so the
        # GOP is closed; repeat-headers puts SPS/PPS in front of every IDR;
        # CBR with filler data keeps the bitrate at the target even for this
        # easy-to-compress pattern (a 1 s VBV buffer leaves room for IDRs).
        "x264-params": (
            f"keyint={keyframe_interval}:min-keyint={keyframe_interval}:scenecut=0:"
            "bframes=0:open-gop=0:intra-refresh=0:repeat-headers=1:annexb=1:rc-lookahead=0:"
            f"nal-hrd=cbr:vbv-maxrate={kbps}:vbv-bufsize={kbps}"
        ),
    }
    ctx.open()
    return ctx


_CACHE: dict[tuple[int, int, Fraction, int, int, int], tuple[tuple[bytes, bool], ...]] = {}
_CACHE_LOCK = threading.Lock()


def _encode_pattern(
    width: int, height: int, fps: float, keyframe_interval: int, bitrate_bps: int, frames: int
) -> tuple[tuple[bytes, bool], ...]:
    """Encode ``frames`` pattern frames; checks every keyframe is a self-contained IDR."""
    painter = _PatternPainter(width, height)
    encoder = _x264_encoder(width, height, fps, keyframe_interval, bitrate_bps)
    packets: list[Any] = []
    for index in range(frames):
        packets.extend(encoder.encode(painter.frame(index)))
    packets.extend(encoder.encode(None))
    if len(packets) != frames:
        raise MediaError(f"libx264 returned {len(packets)} packets for {frames} frames")
    encoded: list[tuple[bytes, bool]] = []
    for index, packet in enumerate(packets):
        data = bytes(packet)
        expected_key = index % keyframe_interval == 0
        if bool(packet.is_keyframe) != expected_key or (
            expected_key and not is_self_contained_idr(data)
        ):
            raise MediaError(
                f"libx264 frame {index}: unexpected keyframe layout {nal_unit_types(data)}"
            )
        encoded.append((data, expected_key))
    return tuple(encoded)


def encoded_test_pattern(
    width: int, height: int, fps: float, keyframe_interval: int, bitrate_bps: int, frames: int
) -> tuple[tuple[bytes, bool], ...]:
    """The cached (data, keyframe) loop for these parameters, encoding it on first use."""
    key = (width, height, _rate(fps), keyframe_interval, bitrate_bps, frames)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is None:
            cached = _CACHE[key] = _encode_pattern(
                width, height, fps, keyframe_interval, bitrate_bps, frames
            )
    return cached


class TestPatternSource:
    """Infinite real H.264 of a moving test pattern, pre-encoded once and looped.

    The loop is ``loop_seconds`` rounded up to a whole number of GOPs, so each
    pass starts with an IDR; ``pts_us`` keeps increasing across passes.  The
    encoded loop is shared by all sources with the same parameters.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        width: int = 640,
        height: int = 360,
        fps: float = 25,
        keyframe_interval: int = 50,
        bitrate_bps: int = 1_000_000,
        loop_seconds: float = 10,
    ) -> None:
        _check_size(width, height)
        if keyframe_interval < 1 or loop_seconds <= 0:
            raise ValueError("keyframe_interval must be >= 1 and loop_seconds positive")
        self.width, self.height = width, height
        self.fps = float(fps)
        self.keyframe_interval = keyframe_interval
        self.bitrate_bps = bitrate_bps
        gops = max(1, math.ceil(loop_seconds * self.fps / keyframe_interval - 1e-9))
        self.loop_frames = gops * keyframe_interval
        self._loop = encoded_test_pattern(
            width, height, fps, keyframe_interval, bitrate_bps, self.loop_frames
        )
        self._index = 0
        self._interval_us = 1_000_000.0 / self.fps

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        index = self._index
        self._index = index + 1
        data, keyframe = self._loop[index % self.loop_frames]
        return Sample(round(index * self._interval_us), keyframe, Codec.H264, data)

    def close(self) -> None:
        """Nothing to release (the encoded loop stays cached)."""


# --------------------------------------------------------------------------
# File source


def _open_input(path: str) -> Any:
    if not os.path.exists(path):
        raise MediaError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise MediaError(f"{path}: not a regular file")
    try:
        return av.open(path, "r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: cannot read as a media file ({exc})") from exc


class FileSource:
    """H.264 samples from a video file, looped forever by default.

    H.264 streams without B-frames are passed through, converted to Annex-B
    (``h264_mp4toannexb``) with SPS/PPS put in front of every keyframe; any
    other video (or H.264 with B-frames, whose decode order is not
    presentation order) is transcoded with libx264 like
    :class:`TestPatternSource`, using ``keyframe_interval`` and
    ``bitrate_bps``.  ``pts_us`` start at 0 and keep increasing across loops.
    Raises :class:`MediaError` for a missing/unreadable file or one without video.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        loop: bool = True,
        *,
        keyframe_interval: int = 50,
        bitrate_bps: int = 1_000_000,
    ) -> None:
        self.path = os.fspath(path)
        self.loop = loop
        self.keyframe_interval = keyframe_interval
        self.bitrate_bps = bitrate_bps
        container = _open_input(self.path)
        try:
            if not container.streams.video:
                raise MediaError(f"{self.path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            self.fps = float(rate) if rate else 25.0
            ctx = stream.codec_context
            self.source_codec: str = ctx.name
            self.transcoding = ctx.name != "h264" or bool(ctx.has_b_frames)
            self.width, self.height = ctx.width, ctx.height
        except BaseException:
            container.close()
            raise
        self._container: Any = container
        self._interval_us = 1_000_000.0 / self.fps
        self._gen = self._run()

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        return next(self._gen)

    def close(self) -> None:
        """Stop iterating and close the file."""
        self._gen.close()
        if self._container is not None:
            self._container.close()
            self._container = None

    def _run(self) -> Generator[Sample, None, None]:
        offset_us = 0
        try:
            while True:
                if self._container is None:
                    self._container = _open_input(self.path)
                passes = self._transcode_pass if self.transcoding else self._copy_pass
                last_us = -1
                for sample in passes(self._container, offset_us):
                    last_us = sample.pts_us
                    yield sample
                self._container.close()
                self._container = None
                if last_us < 0:
                    raise MediaError(f"{self.path}: no video frames")
                if not self.loop:
                    return
                offset_us = last_us + round(self._interval_us)
        finally:
            if self._container is not None:
                self._container.close()
                self._container = None

    def _to_us(self, stream: Any, ts: int | None, base: int | None, count: int) -> int:
        if ts is None or base is None or stream.time_base is None:
            return round(count * self._interval_us)
        return round((ts - base) * stream.time_base * 1_000_000)

    def _copy_pass(self, container: Any, offset_us: int) -> Iterator[Sample]:
        stream = container.streams.video[0]
        extradata = stream.codec_context.extradata
        keeper = _ParameterSetKeeper(_parameter_sets_from_extradata(extradata))
        needs_bsf = bool(extradata) and not (
            extradata.startswith(b"\x00\x00\x01") or extradata.startswith(_START_CODE)
        )
        bsf = av.bitstream.BitStreamFilterContext("h264_mp4toannexb", stream) if needs_bsf else None
        base: int | None = stream.start_time
        count = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                for out in bsf.filter(packet) if bsf is not None else [packet]:
                    ts = out.pts if out.pts is not None else out.dts
                    if base is None:
                        base = ts
                    data, keyframe = keeper.process(bytes(out), bool(out.is_keyframe))
                    pts_us = offset_us + self._to_us(stream, ts, base, count)
                    count += 1
                    yield Sample(pts_us, keyframe, Codec.H264, data)
        except av.error.FFmpegError as exc:
            raise MediaError(f"{self.path}: error while reading ({exc})") from exc

    def _transcode_pass(self, container: Any, offset_us: int) -> Iterator[Sample]:
        stream = container.streams.video[0]
        width, height = max(16, self.width & ~1), max(16, self.height & ~1)
        encoder = _x264_encoder(width, height, self.fps, self.keyframe_interval, self.bitrate_bps)
        pending: deque[int] = deque()
        base: int | None = stream.start_time
        count = 0

        def emit(packets: list[Any]) -> Iterator[Sample]:
            for packet in packets:
                pts_us = (
                    pending.popleft() if pending else offset_us + round(count * self._interval_us)
                )
                yield Sample(pts_us, bool(packet.is_keyframe), Codec.H264, bytes(packet))

        try:
            for frame in container.decode(stream):
                if base is None:
                    base = frame.pts
                pending.append(offset_us + self._to_us(stream, frame.pts, base, count))
                image = frame.reformat(width=width, height=height, format="yuv420p")
                image.pts = count
                image.pict_type = av.video.frame.PictureType.NONE  # keyframes at our interval only
                count += 1
                yield from emit(encoder.encode(image))
            yield from emit(encoder.encode(None))
        except av.error.FFmpegError as exc:
            raise MediaError(f"{self.path}: error while transcoding ({exc})") from exc


# --------------------------------------------------------------------------
# Writing and checking


class AnnexBWriter:
    """Writes H.264 samples to a raw ``.h264`` (Annex-B) file; skips and counts OPAQUE ones.

    With ``skip_until_keyframe`` the file starts at the first keyframe, so it
    decodes cleanly even when the stream was joined mid-GOP.
    """

    def __init__(self, path: str | os.PathLike[str], *, skip_until_keyframe: bool = False) -> None:
        self.path = os.fspath(path)
        self._file: IO[bytes] | None = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._waiting = skip_until_keyframe
        self.samples_written = 0
        self.bytes_written = 0
        self.skipped_opaque = 0
        self.skipped_before_keyframe = 0

    def write(self, sample: Sample) -> None:
        if self._file is None:
            raise ValueError("AnnexBWriter is closed")
        if sample.codec != Codec.H264:
            self.skipped_opaque += 1
            return
        if self._waiting:
            if not sample.keyframe:
                self.skipped_before_keyframe += 1
                return
            self._waiting = False
        self._file.write(sample.data)
        self.samples_written += 1
        self.bytes_written += len(sample.data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> AnnexBWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _new_h264_decoder() -> Any:
    ctx: Any = av.CodecContext.create("h264", "r")
    ctx.thread_count = 1  # cheap, and no frame-threading delay
    return ctx


class H264Checker:
    """Incremental H.264 decoder that counts decoded frames and errors; never raises on bad data.

    ``decode_errors`` counts access units the decoder rejected plus frames it
    flagged as corrupt; ``width``/``height`` are those of the last frame.
    """

    def __init__(self) -> None:
        self._ctx = _new_h264_decoder()
        self.access_units = 0
        self.frames_decoded = 0
        self.decode_errors = 0
        self.width: int | None = None
        self.height: int | None = None

    def feed(self, data: bytes) -> int:
        """Decode one access unit; return how many frames it produced."""
        self.access_units += 1
        if not data:  # an empty packet would put the decoder into draining mode
            self.decode_errors += 1
            return 0
        return self._decode(av.Packet(data))

    def flush(self) -> int:
        """Drain frames the decoder still holds (end of stream); the checker is reset after."""
        count = self._decode(None)
        self._ctx = _new_h264_decoder()
        return count

    def _decode(self, packet: Any) -> int:
        try:
            frames = self._ctx.decode(packet)
        except av.error.EOFError:
            self._ctx = _new_h264_decoder()
            self.decode_errors += 1
            return 0
        except (av.error.FFmpegError, ValueError):
            self.decode_errors += 1
            return 0
        for frame in frames:
            if frame.is_corrupt:
                self.decode_errors += 1
            self.width, self.height = frame.width, frame.height
        self.frames_decoded += len(frames)
        return len(frames)


def decode_file(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Decode a raw ``.h264`` file; return (frames decoded, decode errors).

    An empty file gives (0, 0); a missing one raises :class:`MediaError`.
    """
    name = os.fspath(path)
    try:
        if os.path.getsize(name) == 0:
            return 0, 0
        with open(name, "rb"):
            pass
    except OSError as exc:
        raise MediaError(f"{name}: cannot read ({exc})") from exc
    try:
        container: Any = av.open(name, "r", format="h264")
    except av.error.FFmpegError:
        return 0, 1
    frames = errors = 0
    with container:
        if not container.streams.video:
            return 0, 1
        stream = container.streams.video[0]
        stream.thread_count = 1
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError:
                errors += 1
                break
            try:
                decoded = packet.decode()
            except (av.error.FFmpegError, ValueError):
                errors += 1
                continue
            frames += len(decoded)
            errors += sum(1 for frame in decoded if frame.is_corrupt)
    return frames, errors


def make_test_video_file(
    path: str | os.PathLike[str],
    seconds: float = 2,
    fps: float = 25,
    *,
    width: int = 320,
    height: int = 180,
    codec: str = "libx264",
    b_frames: int = 0,
) -> None:
    """Write a small MP4 of the test pattern (H.264 by default, keyframe every second).

    ``codec`` (e.g. ``"mpeg4"``) and ``b_frames`` exist to exercise other
    paths of :class:`FileSource`.
    """
    _check_size(width, height)
    rate = _rate(fps)
    frames = max(1, round(seconds * float(rate)))
    gop = max(1, round(float(rate)))
    painter = _PatternPainter(width, height)
    try:
        container: Any = av.open(os.fspath(path), "w", format="mp4")
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError(f"{os.fspath(path)}: cannot write ({exc})") from exc
    with container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 500_000
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = b_frames
        if codec == "libx264":
            stream.options = {
                "preset": "ultrafast",
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={b_frames}",
            }
        for index in range(frames):
            container.mux(stream.encode(painter.frame(index)))
        container.mux(stream.encode(None))
