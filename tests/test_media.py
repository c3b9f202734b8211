"""Tests for evserver.media: sources, Annex-B writing and H.264 checking (small sizes, fast)."""

from __future__ import annotations

import itertools
import wave
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evserver.media import (
    NAL_IDR,
    NAL_PPS,
    NAL_SPS,
    AnnexBWriter,
    Codec,
    FileSource,
    H264Checker,
    MediaError,
    MediaSource,
    Sample,
    SyntheticSource,
    TestPatternSource,
    _ParameterSetKeeper,
    decode_file,
    is_self_contained_idr,
    make_test_video_file,
    nal_unit_types,
    split_nal_units,
)

W, H, FPS, KEYINT = 160, 90, 25, 10
FRAME_US = 1_000_000 // FPS


def pattern(loop_seconds: float = 1) -> TestPatternSource:
    """Small test pattern: loop of 1 s rounded up to 3 GOPs of 10 = 30 frames."""
    return TestPatternSource(
        W, H, fps=FPS, keyframe_interval=KEYINT, bitrate_bps=200_000, loop_seconds=loop_seconds
    )


def take(source: MediaSource, n: int) -> list[Sample]:
    return list(itertools.islice(source, n))


def assert_self_contained_idr(data: bytes) -> None:
    types = nal_unit_types(data)
    assert NAL_IDR in types, types
    first_idr = types.index(NAL_IDR)
    assert NAL_SPS in types[:first_idr] and NAL_PPS in types[:first_idr], types
    assert types.index(NAL_SPS) < types.index(NAL_PPS) < first_idr, types


def decode(samples: list[Sample]) -> H264Checker:
    checker = H264Checker()
    for sample in samples:
        checker.feed(sample.data)
    return checker


# ---------------------------------------------------------------- NAL helpers


def test_split_nal_units_handles_both_start_code_lengths() -> None:
    data = (
        b"\x00\x00\x00\x01\x67\x42\x00"
        + b"\x00\x00\x01\x68\xce"
        + b"\x00\x00\x00\x01\x65\x88\x84\x00"
    )
    assert split_nal_units(data) == [b"\x67\x42", b"\x68\xce", b"\x65\x88\x84"]
    assert nal_unit_types(data) == [NAL_SPS, NAL_PPS, NAL_IDR]
    assert is_self_contained_idr(data)
    assert not is_self_contained_idr(b"\x00\x00\x01\x65\x88" + b"\x00\x00\x01\x67\x42")
    assert split_nal_units(b"no start code") == []


def test_parameter_set_keeper_inserts_sps_pps_after_aud() -> None:
    sps, pps = b"\x67\x42\xc0\x1e", b"\x68\xce\x3c\x80"
    keeper = _ParameterSetKeeper([sps, pps])
    bare_idr = b"\x00\x00\x00\x01\x09\xf0" + b"\x00\x00\x00\x01\x65\x88\x84"
    data, keyframe = keeper.process(bare_idr, True)
    assert keyframe
    assert nal_unit_types(data) == [9, NAL_SPS, NAL_PPS, NAL_IDR]
    # A "keyframe" that is no IDR is not reported as a keyframe.
    assert keeper.process(b"\x00\x00\x01\x41\x9a", True) == (b"\x00\x00\x01\x41\x9a", False)
    with pytest.raises(MediaError, match="SPS/PPS"):
        _ParameterSetKeeper([]).process(bare_idr, True)


# ---------------------------------------------------------------- TestPatternSource


def test_pattern_keyframes_are_idr_with_sps_pps_at_the_interval() -> None:
    source = pattern()
    assert isinstance(source, MediaSource)
    assert source.loop_frames == 30 and source.loop_frames % KEYINT == 0
    samples = take(source, 70)
    for index, sample in enumerate(samples):
        assert sample.codec is Codec.H264
        assert sample.pts_us == index * FRAME_US
        assert sample.keyframe == (index % KEYINT == 0), index
        if sample.keyframe:
            assert_self_contained_idr(sample.data)
        else:
            assert NAL_IDR not in nal_unit_types(sample.data)
    # The loop repeats the same access units, with pts still increasing.
    assert samples[30].data == samples[0].data and samples[31].data == samples[1].data


def test_pattern_loop_decodes_across_the_boundary() -> None:
    checker = decode(take(pattern(), 70))  # two loop boundaries (30, 60)
    assert (checker.frames_decoded, checker.decode_errors) == (70, 0)
    assert (checker.width, checker.height) == (W, H)


def test_pattern_decodes_from_a_later_keyframe_but_not_from_a_delta_frame() -> None:
    samples = take(pattern(), 70)
    late = decode(samples[40:])
    assert (late.frames_decoded, late.decode_errors) == (30, 0)
    # Control: joining mid-GOP is visibly broken, so the check above means something.
    mid = decode(samples[41:])
    assert mid.decode_errors > 0 or mid.frames_decoded < len(samples) - 41


def test_pattern_cache_is_shared_and_bitrate_is_near_target() -> None:
    first, second = pattern(), pattern()
    assert next(first).data is next(second).data
    samples = take(TestPatternSource(W, H, FPS, KEYINT, 200_000, loop_seconds=10), 250)
    bits = sum(len(s.data) for s in samples) * 8
    assert 0.9 * 200_000 * 10 < bits < 1.1 * 200_000 * 10
    keys = [len(s.data) for s in samples if s.keyframe]
    deltas = sorted(len(s.data) for s in samples if not s.keyframe)
    assert min(keys) > deltas[len(deltas) // 2]


def test_pattern_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        TestPatternSource(161, 90)
    with pytest.raises(ValueError):
        TestPatternSource(W, H, keyframe_interval=0)


# ---------------------------------------------------------------- AnnexBWriter and decode_file


def test_annexb_writer_output_decodes(tmp_path: Path) -> None:
    opaque = SyntheticSource(100_000, FPS, KEYINT)
    path = tmp_path / "out.h264"
    with AnnexBWriter(path) as writer:
        for sample in take(pattern(), 45):
            writer.write(sample)
            writer.write(next(opaque))
    assert (writer.samples_written, writer.skipped_opaque) == (45, 45)
    assert writer.bytes_written == path.stat().st_size
    assert decode_file(path) == (45, 0)
    with pytest.raises(ValueError):
        writer.write(next(pattern()))


def test_annexb_writer_can_start_at_the_first_keyframe(tmp_path: Path) -> None:
    path = tmp_path / "joined.h264"
    with AnnexBWriter(path, skip_until_keyframe=True) as writer:
        for sample in take(pattern(), 45)[13:]:
            writer.write(sample)
    assert (writer.skipped_before_keyframe, writer.samples_written) == (7, 25)
    assert decode_file(path) == (25, 0)


def test_decode_file_edge_cases(tmp_path: Path) -> None:
    with pytest.raises(MediaError):
        decode_file(tmp_path / "missing.h264")
    empty = tmp_path / "empty.h264"
    empty.write_bytes(b"")
    assert decode_file(empty) == (0, 0)
    garbage = tmp_path / "garbage.h264"
    garbage.write_bytes(b"\x00\x00\x00\x01" + bytes(range(256)) * 20)
    frames, errors = decode_file(garbage)
    assert frames == 0 or errors > 0


# ---------------------------------------------------------------- FileSource


@pytest.fixture(scope="module")
def mp4_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    make_test_video_file(path, seconds=1, fps=FPS, width=W, height=H)
    return path


def test_file_source_yields_annexb_with_keyframes(mp4_file: Path) -> None:
    source = FileSource(mp4_file, loop=False)
    assert not source.transcoding and source.fps == FPS
    samples = list(source)
    assert len(samples) == 25
    assert [s.pts_us for s in samples] == [i * FRAME_US for i in range(25)]
    assert samples[0].keyframe
    for sample in samples:
        assert sample.codec is Codec.H264
        assert sample.data.startswith(b"\x00\x00\x01") or sample.data.startswith(
            b"\x00\x00\x00\x01"
        )
        if sample.keyframe:
            assert_self_contained_idr(sample.data)
    checker = decode(samples)
    assert (checker.frames_decoded, checker.decode_errors, checker.width) == (25, 0, W)


def test_file_source_loops_with_increasing_pts(mp4_file: Path) -> None:
    source = FileSource(mp4_file)
    samples = take(source, 60)
    source.close()
    pts = [s.pts_us for s in samples]
    assert pts == sorted(set(pts)) and pts[25] == 25 * FRAME_US
    assert samples[25].keyframe and samples[25].data == samples[0].data
    assert (decode(samples).frames_decoded, decode(samples).decode_errors) == (60, 0)
    late = decode(samples[25:])  # a fresh decoder at the second pass
    assert (late.frames_decoded, late.decode_errors) == (35, 0)


@pytest.mark.parametrize(
    "kwargs", [{"codec": "mpeg4"}, {"b_frames": 2}], ids=["mpeg4", "h264-bframes"]
)
def test_file_source_transcodes_other_video(tmp_path: Path, kwargs: dict[str, object]) -> None:
    path = tmp_path / "other.mp4"
    make_test_video_file(path, seconds=1, fps=FPS, width=W, height=H, **kwargs)  # type: ignore[arg-type]
    source = FileSource(path, loop=False, keyframe_interval=KEYINT, bitrate_bps=200_000)
    assert source.transcoding
    samples = list(source)
    assert [s.pts_us for s in samples] == [i * FRAME_US for i in range(25)]
    assert [i for i, s in enumerate(samples) if s.keyframe] == [0, 10, 20]
    for sample in samples:
        if sample.keyframe:
            assert_self_contained_idr(sample.data)
    checker = decode(samples)
    assert (checker.frames_decoded, checker.decode_errors) == (25, 0)


def test_file_source_reads_raw_annexb(tmp_path: Path) -> None:
    path = tmp_path / "raw.h264"
    with AnnexBWriter(path) as writer:
        for sample in take(pattern(), 20):
            writer.write(sample)
    samples = list(FileSource(path, loop=False))
    assert len(samples) == 20
    assert [i for i, s in enumerate(samples) if s.keyframe] == [0, 10]
    assert (decode(samples[10:]).frames_decoded, decode(samples[10:]).decode_errors) == (10, 0)


def test_file_source_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="no such file"):
        FileSource(tmp_path / "missing.mp4")
    text = tmp_path / "notes.txt"
    text.write_text("this is not a video\n" * 10)
    with pytest.raises(MediaError, match="cannot read"):
        FileSource(text)
    audio = tmp_path / "tone.wav"
    with wave.open(str(audio), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x01" * 800)
    with pytest.raises(MediaError, match="no video stream"):
        FileSource(audio)
    with pytest.raises(MediaError):
        FileSource(tmp_path)


# ---------------------------------------------------------------- SyntheticSource


@pytest.mark.parametrize(
    ("bitrate", "fps", "keyint"),
    [(1_000_000, 25, 50), (250_000, 29.97, 30), (64_000, 10, 1), (3_000_000, 30, 7)],
)
def test_synthetic_bitrate_and_keyframes(bitrate: int, fps: float, keyint: int) -> None:
    source = SyntheticSource(bitrate, fps, keyint, seed=3)
    samples = take(source, round(10 * fps))
    seconds = len(samples) / fps
    assert abs(sum(len(s.data) for s in samples) * 8 / seconds - bitrate) < 0.05 * bitrate
    step = 1_000_000 / fps
    for index, sample in enumerate(samples):
        assert sample.codec is Codec.OPAQUE
        assert sample.keyframe == (index % keyint == 0)
        assert abs(sample.pts_us - index * step) <= 0.5
    if keyint > 1:
        keys = [len(s.data) for s in samples if s.keyframe]
        deltas = [len(s.data) for s in samples if not s.keyframe]
        assert min(keys) / max(deltas) > 4.5 and max(keys) / min(deltas) < 5.5
    # A handful of shared buffers, not one allocation per sample.
    assert len({id(s.data) for s in samples}) <= 4


def test_synthetic_seed_and_validation() -> None:
    assert (
        next(SyntheticSource(100_000, 25, 10, seed=1)).data
        != next(SyntheticSource(100_000, 25, 10, seed=2)).data
    )
    assert (
        next(SyntheticSource(100_000, 25, 10, seed=1)).data
        == next(SyntheticSource(100_000, 25, 10, seed=1)).data
    )
    for args in [(0, 25, 10), (100_000, 0, 10), (100_000, 25, 0)]:
        with pytest.raises(ValueError):
            SyntheticSource(*args)


# ---------------------------------------------------------------- H264Checker


@settings(max_examples=25, deadline=None)
@given(chunks=st.lists(st.binary(max_size=600), min_size=1, max_size=6), prefix=st.booleans())
def test_checker_survives_random_bytes(chunks: list[bytes], prefix: bool) -> None:
    checker = H264Checker()
    for chunk in chunks:
        checker.feed(b"\x00\x00\x00\x01" + chunk if prefix else chunk)
    checker.flush()
    assert checker.access_units == len(chunks)
    assert checker.frames_decoded == 0 or checker.decode_errors > 0


def test_checker_recovers_after_garbage_and_empty_input() -> None:
    checker = H264Checker()
    assert checker.feed(b"") == 0
    assert checker.feed(b"\x00\x00\x00\x01\x65" + b"\xff" * 50) == 0
    errors = checker.decode_errors
    assert errors >= 1
    decoded = sum(checker.feed(s.data) for s in take(pattern(), 20))
    assert decoded == 20 and checker.frames_decoded == 20 and checker.decode_errors == errors
