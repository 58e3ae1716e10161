"""The SEG read-back check: medseg's own decoder (``decode_seg_frames``, pydicom only) gives
what highdicom's full decoder gives, and ``verify_seg`` refuses a SEG whose pixels, source
references or segments are wrong, naming what differs."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

import medseg
from medseg.errors import OutputError
from medseg.io.dicom_seg import (
    build_seg,
    decode_seg_frames,
    verify_seg,
    warm_up_in_background,
)
from medseg.synth import write_phantom_study


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ph")
    paths = write_phantom_study(out, seed=3, shape=(24, 64, 64), spacing=(4.0, 4.0, 6.0))
    image = medseg.load(paths["dicom"])
    labels = medseg.load(paths["labels"])
    return build_seg(image, image.with_array(np.asarray(labels.array, np.uint8)))


def _resave(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_own_decoder_agrees_with_highdicom(encoded) -> None:
    ours = decode_seg_frames(encoded.data, encoded.planes)
    assert np.array_equal(ours, encoded.frames)
    assert set(np.unique(ours).tolist()) == {0, 1, 2}
    seg = hd.seg.segread(io.BytesIO(encoded.data))
    theirs = seg.get_pixels_by_source_instance(
        [p.sop_instance_uid for p in encoded.planes], combine_segments=True,
        assert_missing_frames_are_empty=True, dtype=np.uint8)
    assert np.array_equal(ours, theirs)


def test_changed_pixels_are_refused_naming_the_plane(encoded) -> None:
    ds = pydicom.dcmread(io.BytesIO(encoded.data))
    packed = bytearray(ds.PixelData)
    frame_bytes = ds.Rows * ds.Columns // 8
    packed[frame_bytes // 2] ^= 0xFF  # eight pixels of the first stored frame
    ds.PixelData = bytes(packed)
    with pytest.raises(OutputError, match=r"read-back check failed.* 8 pixel\(s\) on 1 source "
                       r"plane\(s\), first SOPInstanceUID") as exc:
        verify_seg(_resave(ds), encoded.frames, encoded.planes, path="x")
    assert "nothing written" in str(exc.value)


def test_a_frame_from_an_unknown_image_is_refused(encoded) -> None:
    ds = pydicom.dcmread(io.BytesIO(encoded.data))
    src = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0] \
        .SourceImageSequence[0]
    src.ReferencedSOPInstanceUID = "1.2.3.4"
    with pytest.raises(OutputError, match=r"does not decode again.*1\.2\.3\.4.*not one of "
                       r"the source planes"):
        verify_seg(_resave(ds), encoded.frames, encoded.planes)


def test_a_pixel_in_two_segments_is_refused(encoded) -> None:
    ds = pydicom.dcmread(io.BytesIO(encoded.data))
    groups = ds.PerFrameFunctionalGroupsSequence
    seg_of = [int(g.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for g in groups]
    src_of = [g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
              for g in groups]
    # a left-lung frame made to claim the source plane of a right-lung frame
    i = seg_of.index(1)
    j = next(k for k in range(len(groups)) if seg_of[k] == 2)
    groups[j].DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID = \
        src_of[i]
    packed = bytearray(ds.PixelData)
    n = ds.Rows * ds.Columns // 8
    packed[j * n:(j + 1) * n] = packed[i * n:(i + 1) * n]  # the same pixels
    ds.PixelData = bytes(packed)
    with pytest.raises(OutputError, match="belong to two segments"):
        verify_seg(_resave(ds), encoded.frames, encoded.planes)


def test_warm_up_runs_once_and_the_seg_still_builds(tmp_path: Path) -> None:
    import medseg.io.dicom_seg as dseg

    warm_up_in_background()
    first = dseg._WARM_THREAD
    warm_up_in_background()
    assert dseg._WARM_THREAD is first and first is not None
    first.join(timeout=60)
    assert not first.is_alive()


def test_the_seg_reuses_the_headers_the_loader_read(tmp_path: Path) -> None:
    """The SEG writer takes the source headers from the loaded volume (issue 14: reading
    141 files again cost 0.4 s): it builds the same SEG with the source files gone, and
    the same as from headers read again."""
    paths = write_phantom_study(tmp_path, seed=3, shape=(24, 64, 64), spacing=(4.0, 4.0, 6.0))
    image = medseg.load(paths["dicom"])
    labels = image.with_array(np.asarray(medseg.load(paths["labels"]).array, np.uint8))
    assert set(image.metadata.source_headers) == set(image.metadata.source_files)
    reread = image.metadata.copy()
    reread.source_headers = {}
    again = build_seg(medseg.CTVolume(image.array, image.geometry, reread), labels)
    for f in image.metadata.source_files:
        Path(f).unlink()
    seg = build_seg(image, labels)
    np.testing.assert_array_equal(seg.frames, again.frames)
    assert [p.sop_instance_uid for p in seg.planes] == [p.sop_instance_uid for p in again.planes]
    # and metadata summaries (segment.json) leave the headers out
    assert "source_headers" not in image.metadata.summary()
