"""The DICOM node against a real Orthanc, end to end: Orthanc sends the Philips chest CT
(141 slices) to ``medseg listen`` by C-STORE (its REST ``/modalities/<name>/store``, what
an Orthanc autorouting script or a user's "Send to DICOM modality" does), the node
segments it and stores the DICOM SEG and SR back into Orthanc, in the same study.

One Orthanc per module with its DICOM server enabled and the node registered as a DICOM
modality; the node runs in a thread of the test process (``start_node``) on a port chosen
before Orthanc starts, since Orthanc's configuration names it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests

import medseg
from medseg.batch import sanitize_id
from tests.conftest import need
from tests.dicomout.world import compare_with_volume
from tests.node.conftest import uids, wait_for
from tests.pacs.conftest import USER, Orthanc, _start, free_port

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

#: Seconds from the end of Orthanc's store call to the SEG stored back in Orthanc: the
#: quiet time, one U-Net segmentation of 141 slices on a loaded CI machine, the SEG/SR
#: writing and the send. Generous: the test checks that it happens, not how fast.
RESULT_TIMEOUT = 240.0
ORTHANC_AET = "ORTHANC"
NODE_AET = "MEDSEG"


@dataclass(frozen=True)
class DicomOrthanc:
    """An Orthanc that speaks DICOM (``dicom_port``) and knows the node as modality
    ``medseg`` (``NODE_AET`` on 127.0.0.1:``node_port``), holding the Philips study."""

    orthanc: Orthanc
    dicom_port: int
    node_port: int
    study_uid: str
    series_uid: str

    def rest(self, method: str, path: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 60)
        r = requests.request(method, f"{self.orthanc.http_root}{path}",
                             auth=(USER, self.orthanc.password), **kwargs)
        assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r.json() if "json" in r.headers.get("Content-Type", "") else r.content

    def lookup(self, uid: str, kind: str) -> str:
        """Orthanc's id of the resource with this DICOM UID."""
        found = [m["ID"] for m in self.rest("POST", "/tools/lookup", data=uid)
                 if m["Type"] == kind]
        assert len(found) == 1, f"{kind} {uid}: {found}"
        return str(found[0])

    def series_by_modality(self, study_id: str) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for s in self.rest("GET", f"/studies/{study_id}/series"):
            out.setdefault(s["MainDicomTags"].get("Modality", ""), []).append(s)
        return out


@pytest.fixture(scope="module")
def dicom_orthanc(shared_data: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[DicomOrthanc]:
    philips = need(shared_data, "chest-ct-philips-141")
    dicom_port, node_port = free_port(), free_port()
    extra = {
        "DicomServerEnabled": True,
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "DicomModalities": {"medseg": [NODE_AET, "127.0.0.1", node_port]},
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
    }
    for orthanc in _start(tmp_path_factory.mktemp("orthanc-dicom"), extra):
        orthanc.upload(philips)
        study_uid, series_uid = uids(philips)
        yield DicomOrthanc(orthanc=orthanc, dicom_port=dicom_port, node_port=node_port,
                           study_uid=study_uid, series_uid=series_uid)


def test_orthanc_sends_ct_and_receives_seg_and_sr(dicom_orthanc: DicomOrthanc,
                                                  start_node: Any, tmp_path: Path) -> None:
    o = dicom_orthanc
    out = tmp_path / "out"
    node = start_node(out, port=o.node_port, allow=[ORTHANC_AET],
                      send_to=f"{ORTHANC_AET}@127.0.0.1:{o.dicom_port}", quiet_time=1.0)
    assert node.port == o.node_port
    o.rest("POST", "/modalities/medseg/echo", json={})  # 200: the node answered C-ECHO

    ct_series = o.lookup(o.series_uid, "Series")
    study = o.lookup(o.study_uid, "Study")
    assert len(o.rest("GET", f"/series/{ct_series}")["Instances"]) == 141
    t0 = time.monotonic()
    o.rest("POST", "/modalities/medseg/store", timeout=300,
           json={"Resources": [ct_series], "Synchronous": True})
    sent = time.monotonic()

    def results() -> dict[str, list[dict[str, Any]]] | None:
        found = o.series_by_modality(study)
        return found if "SEG" in found and "SR" in found else None

    def failed() -> str | None:  # fail at once, with the node's log, if the study failed
        rows = [r for r in node.series().values() if r.status in ("failed", "not_segmented")]
        return "; ".join(f"{r.series_uid}: {r.status} ({r.reason})" for r in rows) or None

    def seg_or_failure() -> Any:
        if (why := failed()) is not None:
            pytest.fail(f"the node did not segment the series: {why}\n"
                        + "\n".join(node.logs))
        return "SEG" in o.series_by_modality(study)

    wait_for("the SEG stored back in Orthanc", seg_or_failure, timeout=RESULT_TIMEOUT)
    latency = time.monotonic() - sent
    found = wait_for("the SR stored back in Orthanc", results, timeout=60)
    print(f"\nOrthanc store call (141 instances): {sent - t0:.1f} s; from its return to the "
          f"SEG in Orthanc: {latency:.1f} s")
    assert latency < RESULT_TIMEOUT

    (seg_series,), (sr_series,) = found["SEG"], found["SR"]
    (seg_id,), (sr_id,) = seg_series["Instances"], sr_series["Instances"]
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg_path.write_bytes(o.rest("GET", f"/instances/{seg_id}/file"))
    sr_path.write_bytes(o.rest("GET", f"/instances/{sr_id}/file"))
    seg, sr = pydicom.dcmread(seg_path), pydicom.dcmread(sr_path)

    # both in the CT's study, referencing the CT series (the SR through the SEG's segments)
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == o.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == o.series_uid
    import highdicom as hd

    report = hd.sr.srread(sr_path)
    assert [e[2] for e in report.get_evidence()] == [seg.SOPInstanceUID]
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert sorted(n for g in groups for n in g.referenced_segment.referenced_segment_numbers
                  ) == [1, 2]
    for g in groups:
        ref = g.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.source_series_for_segmentation.value == o.series_uid

    # the SEG Orthanc holds is the node's lungs.nii.gz, pixel for pixel in world space
    result = out / sanitize_id(o.study_uid)
    written = pydicom.dcmread(result / "lungs.seg.dcm")  # Orthanc rewrites the file meta
    assert (written.SOPInstanceUID, written.PixelData) == (seg.SOPInstanceUID, seg.PixelData)
    assert pydicom.dcmread(result / "lungs.sr.dcm").SOPInstanceUID == sr.SOPInstanceUID
    mask = medseg.load(result / "lungs.nii.gz")
    assert set(np.unique(mask.array)) == {0, 1, 2}
    agreement = compare_with_volume(seg_path, mask)
    assert agreement.labelled == int(np.count_nonzero(mask.array))
    assert agreement.agree == agreement.labelled, agreement

    # the node's records: the series done and sent, nothing left in the spool
    row = node.series()[o.series_uid]
    assert (row.status, row.instances, row.calling_ae) == ("done", 141, ORTHANC_AET), row
    assert node.node.state is not None
    wait_for("the send recorded", lambda: [s.status for s in node.node.state.sends()]
             == ["sent"], timeout=30)
    assert not list((out / ".spool").rglob("*.dcm"))
    node.close()
    print("\n".join(f"node: {line}" for line in node.logs))
