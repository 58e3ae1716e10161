"""``medseg listen`` end to end in this process: phantom series sent by a pynetdicom SCU,
segmented, the SEG and SR stored at a pynetdicom receiver; who may store; what is not
segmented and why; aborted transfers; series sent again; failed sends retried."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from medseg.batch import StateDB, sanitize_id
from medseg.errors import ConfigError
from medseg.node import service
from medseg.node.scp import safe_uid
from medseg.node.send import Destination
from medseg.node.service import NodeConfig
from tests.node.conftest import (
    QUIET,
    Receiver,
    RunningNode,
    send_series,
    series_files,
    uids,
    wait_for,
)
from tests.pacs.conftest import free_port

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _batch_row(out: Path, study_uid: str) -> dict[str, object] | None:
    db = out / "batch.sqlite"
    if not db.exists():
        return None
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM studies WHERE study_id = ?",
                               (sanitize_id(study_uid),)).fetchone()
    except sqlite3.OperationalError:  # the node is creating it
        return None
    return dict(row) if row is not None else None


def _spooled(out: Path) -> list[Path]:
    return sorted((out / ".spool").rglob("*.dcm"))


def _done(node: RunningNode, study_uid: str) -> bool:
    row = _batch_row(node.out, study_uid)
    return row is not None and row["status"] == "done"


def test_series_is_segmented_and_results_sent(tmp_path: Path, start_node: Callable[...,
                                              RunningNode], receiver: Receiver,
                                              phantom_series: Callable[..., Path]) -> None:
    src = phantom_series(1)
    study_uid, series_uid = uids(src)
    node = start_node(tmp_path / "out", send_to=f"DEST@127.0.0.1:{receiver.port}")
    assert set(send_series(node.port, src)) == {0}
    wait_for("the SEG and SR at the destination", lambda: len(receiver.received) >= 2)
    assert receiver.modalities() == ["SEG", "SR"]
    out = node.out / sanitize_id(study_uid)
    by_modality = {str(ds.Modality): ds for ds in receiver.received}
    for name, modality in (("lungs.seg.dcm", "SEG"), ("lungs.sr.dcm", "SR")):
        written = pydicom.dcmread(out / name, stop_before_pixels=True)
        assert by_modality[modality].SOPInstanceUID == written.SOPInstanceUID
        assert by_modality[modality].StudyInstanceUID == study_uid
    seg = by_modality["SEG"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    wait_for("the send recorded", lambda: node.node.state is not None and
             [s.status for s in node.node.state.sends()] == ["sent"])
    row = node.series()[series_uid]
    assert row.status == "done" and row.instances == len(series_files(src))
    assert row.calling_ae == "SENDER" and row.transfer == "released"
    assert _spooled(node.out) == []  # the spool is removed once the study is done
    summary = (node.out / "summary.csv").read_text()
    assert sanitize_id(study_uid) in summary
    node.close()
    header = pydicom.dcmread(series_files(src)[0], stop_before_pixels=True)
    phi = [str(v) for v in (header.get("PatientName"), header.get("PatientID")) if v]
    assert phi and not [m for m in node.logs for v in phi if v in m]  # never in the logs


def test_unknown_calling_or_called_ae_title_is_rejected(tmp_path: Path,
                                                        start_node: Callable[...,
                                                                             RunningNode],
                                                        phantom_series: Callable[..., Path]
                                                        ) -> None:
    node = start_node(tmp_path / "out")
    for calling, called in (("STRANGER", "MEDSEG"), ("SENDER", "OTHER")):
        ae = AE(ae_title=calling)
        ae.add_requested_context(CT)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
        assert assoc.is_rejected, (calling, called)
    # the allowed sender is accepted and C-ECHO works
    ae = AE(ae_title="SENDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDSEG")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    assert any("STRANGER" in m and "rejected" in m for m in node.logs)
    assert _spooled(node.out) == [] and node.series() == {}
    node.close()


def test_other_sop_classes_are_refused_politely(tmp_path: Path,
                                                start_node: Callable[..., RunningNode],
                                                phantom_series: Callable[..., Path]) -> None:
    node = start_node(tmp_path / "out")
    src = phantom_series(1, sop_class="1.2.840.10008.5.1.4.1.1.7")  # secondary capture
    ae = AE(ae_title="SENDER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDSEG")
    assert assoc.is_established
    rejected = [cx for cx in assoc.rejected_contexts]
    assert [str(cx.abstract_syntax) for cx in rejected] == ["1.2.840.10008.5.1.4.1.1.7"]
    with pytest.raises(ValueError, match="presentation context"):
        assoc.send_c_store(series_files(src)[0])
    assert int(assoc.send_c_echo().Status) == 0  # still serving
    assoc.release()
    assert node.series() == {}
    node.close()


def test_data_set_that_does_not_match_its_request_gets_a_failure_status(
        tmp_path: Path, start_node: Callable[..., RunningNode],
        phantom_series: Callable[..., Path]) -> None:
    node = start_node(tmp_path / "out")
    src = phantom_series(1, keep=1)
    f = series_files(src)[0]
    ds = pydicom.dcmread(f)
    del ds.SeriesInstanceUID
    ds.save_as(f, enforce_file_format=True)
    assert send_series(node.port, src) == [0xA900]
    assert node.series() == {} and _spooled(node.out) == []
    node.close()


def test_mr_and_localizer_are_received_but_not_segmented(
        tmp_path: Path, start_node: Callable[..., RunningNode],
        phantom_series: Callable[..., Path]) -> None:
    node = start_node(tmp_path / "out")
    mr = phantom_series(1, modality="MR", sop_class=MR)
    scout = phantom_series(2, keep=1, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert set(send_series(node.port, mr)) == {0}
    assert set(send_series(node.port, scout)) == {0}
    series = {uids(mr)[1]: "modality MR", uids(scout)[1]: "localizer or single image"}

    def settled() -> bool:
        rows = node.series()
        return all(uid in rows and rows[uid].status == "not_segmented" for uid in series)

    wait_for("both series settled", settled, timeout=30)
    rows = node.series()
    for uid, why in series.items():
        assert why in (rows[uid].reason or ""), rows[uid].reason
    assert _spooled(node.out) == []
    for folder in (mr, scout):
        assert _batch_row(node.out, uids(folder)[0]) is None
        assert not (node.out / sanitize_id(uids(folder)[0])).exists()
    node.close()


def test_best_series_of_a_study_is_chosen(tmp_path: Path,
                                          start_node: Callable[..., RunningNode],
                                          phantom_series: Callable[..., Path]) -> None:
    """A study sent with a localizer and a CT series: the CT is segmented, the localizer
    recorded as not chosen (one association, as a PACS sends a study)."""
    node = start_node(tmp_path / "out")
    ct = phantom_series(1)
    scout = phantom_series(2, keep=1, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    study_uid = uids(ct)[0]
    f = series_files(scout)[0]
    ds = pydicom.dcmread(f)
    ds.StudyInstanceUID = study_uid
    ds.save_as(f, enforce_file_format=True)
    assert set(send_series(node.port, [*series_files(scout), *series_files(ct)])) == {0}
    wait_for("the study done", lambda: _done(node, study_uid))
    # the node settles its series just after the batch records the study done
    wait_for("the CT series settled", lambda: node.series()[uids(ct)[1]].status == "done")
    rows = node.series()
    assert rows[uids(scout)[1]].status == "not_segmented"
    assert "localizer" in (rows[uids(scout)[1]].reason or "")
    node.close()


def test_aborted_transfer_is_not_processed_until_sent_again(
        tmp_path: Path, start_node: Callable[..., RunningNode],
        phantom_series: Callable[..., Path]) -> None:
    node = start_node(tmp_path / "out")
    src = phantom_series(1)
    study_uid, series_uid = uids(src)
    assert send_series(node.port, src, abort_after=10) == [0] * 10
    wait_for("the series marked incomplete",
             lambda: node.series().get(series_uid) is not None and
             node.series()[series_uid].status == "incomplete", timeout=30)
    time.sleep(QUIET * 4)  # well past the quiet time: still not processed
    assert node.series()[series_uid].status == "incomplete"
    assert "without a release" in (node.series()[series_uid].reason or "")
    assert _batch_row(node.out, study_uid) is None
    # the sender tries again, whole: segmented once, from all instances
    assert set(send_series(node.port, src)) == {0}
    wait_for("the study done", lambda: _done(node, study_uid))
    row = _batch_row(node.out, study_uid)
    assert row is not None and row["attempts"] == 1
    seg = json.loads((node.out / sanitize_id(study_uid) / "segment.json").read_text())
    assert seg["input"]["shape_zyx"][0] == len(series_files(src))
    node.close()


def test_series_sent_again_is_segmented_again_only_if_changed(
        tmp_path: Path, start_node: Callable[..., RunningNode], receiver: Receiver,
        phantom_series: Callable[..., Path]) -> None:
    node = start_node(tmp_path / "out", send_to=f"DEST@127.0.0.1:{receiver.port}")
    src = phantom_series(1)
    study_uid, series_uid = uids(src)
    send_series(node.port, src)
    wait_for("the first results", lambda: len(receiver.received) >= 2)
    first = _batch_row(node.out, study_uid)
    assert first is not None
    send_series(node.port, src)  # unchanged
    wait_for("the series settled again", lambda: node.series()[series_uid].status == "done"
             and "unchanged" in (node.series()[series_uid].reason or ""))
    assert _batch_row(node.out, study_uid) == first  # not segmented again
    assert len(receiver.received) == 2  # nothing sent again
    # one instance changed (a corrected slice): segmented and sent again
    f = series_files(src)[5]
    ds = pydicom.dcmread(f)
    ds.WindowCenter = 123
    ds.save_as(f, enforce_file_format=True)
    send_series(node.port, src)
    wait_for("the new results", lambda: len(receiver.received) >= 4)
    second = _batch_row(node.out, study_uid)
    assert second is not None and second["source"] != first["source"]
    assert second["status"] == "done"
    assert _spooled(node.out) == []
    node.close()


def test_failed_send_is_retried_and_never_dropped(
        tmp_path: Path, start_node: Callable[..., RunningNode],
        phantom_series: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "RETRY_FIRST_S", 0.5)
    port = free_port()  # nothing listens there yet
    node = start_node(tmp_path / "out", send_to=f"DEST@127.0.0.1:{port}")
    src = phantom_series(1)
    study_uid = uids(src)[0]
    send_series(node.port, src)
    state = node.node.state
    assert state is not None
    wait_for("a failed send recorded",
             lambda: [s for s in state.sends() if s.attempts >= 1 and s.last_error])
    pending = state.sends()[0]
    assert pending.status == "pending" and "not reachable" in (pending.last_error or "")
    assert any(f"DEST@127.0.0.1:{port}" in m and m.startswith("error:") for m in node.logs)
    dest = Receiver(port=port).start()  # the destination comes back
    try:
        wait_for("the retried send", lambda: len(dest.received) >= 2, timeout=60)
        wait_for("the send recorded", lambda: state.sends()[0].status == "sent")
    finally:
        dest.stop()
    assert state.sends()[0].study_uid == study_uid
    node.close()


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="allow"):
        NodeConfig(out_dir="x")
    with pytest.raises(ConfigError, match="AE_TITLE@HOST:PORT"):
        NodeConfig(out_dir="x", allow_any=True, send_to="pacs:4242")
    with pytest.raises(ValueError, match="tls_key"):
        NodeConfig(out_dir="x", allow_any=True, tls_cert="c.pem")
    assert Destination.parse("ORTHANC@[::1]:4242") == Destination("ORTHANC", "::1", 4242)
    assert str(Destination.parse(" PACS@pacs.example.org:104 ")) == "PACS@pacs.example.org:104"


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2.3/4", "", "1." * 40, "a b",
                                 "1.2.3\0", "..", "1.2.840.10008.1.2.3"])
def test_spool_names_come_from_valid_uids_only(uid: str) -> None:
    name = safe_uid(uid)
    assert "/" not in name and name not in ("", ".", "..") and not name.startswith(".")
    assert len(name) <= 64
    if uid in ("1.2.840.10008.1.2.3", "1.2.3\0"):
        assert name == uid.rstrip("\0")
    else:
        assert name.startswith("x") and len(name) == 41


def test_batch_state_and_summary_hold_node_studies(tmp_path: Path,
                                                   start_node: Callable[..., RunningNode],
                                                   phantom_series: Callable[..., Path]
                                                   ) -> None:
    node = start_node(tmp_path / "out")
    a, b = phantom_series(1), phantom_series(2)
    send_series(node.port, a)
    send_series(node.port, b)
    wait_for("both studies done", lambda: _done(node, uids(a)[0]) and _done(node, uids(b)[0]))
    node.close()
    with StateDB(tmp_path / "out" / "batch.sqlite") as db:
        rows = db.rows()
    assert {r.study_id for r in rows} == {sanitize_id(uids(a)[0]), sanitize_id(uids(b)[0])}
    assert all(r.source.startswith("dicom-node:") for r in rows)
    assert len({r.model_loads for r in rows}) == 1  # the model was not loaded again
    summary = (tmp_path / "out" / "summary.csv").read_text()
    assert all(r.study_id in summary for r in rows)


def test_send_owed_by_a_node_stopped_before_queueing_it_is_made(
        tmp_path: Path, start_node: Callable[..., RunningNode], receiver: Receiver,
        phantom_series: Callable[..., Path]) -> None:
    """A study recorded done whose send was never queued (the node was killed in between):
    when its series comes again, unchanged, it is not segmented again but sent."""
    node = start_node(tmp_path / "out", send_to=f"DEST@127.0.0.1:{receiver.port}")
    src = phantom_series(1)
    study_uid, series_uid = uids(src)
    send_series(node.port, src)
    wait_for("the first results", lambda: len(receiver.received) >= 2)
    first = _batch_row(node.out, study_uid)
    state = node.node.state
    assert state is not None
    wait_for("the send recorded", lambda: [s.status for s in state.sends()] == ["sent"])
    with state.lock:
        state.conn.execute("DELETE FROM sends")
    send_series(node.port, src)
    wait_for("the owed send", lambda: len(receiver.received) >= 4)
    assert _batch_row(node.out, study_uid) == first  # not segmented again
    assert node.series()[series_uid].status == "done"
    node.close()


def test_expired_incomplete_series_is_discarded(
        tmp_path: Path, start_node: Callable[..., RunningNode],
        phantom_series: Callable[..., Path]) -> None:
    node = start_node(tmp_path / "out", incomplete_timeout=1.0)
    src = phantom_series(1)
    series_uid = uids(src)[1]
    send_series(node.port, src, abort_after=5)
    wait_for("the series discarded",
             lambda: node.series().get(series_uid) is not None and
             node.series()[series_uid].status == "discarded", timeout=30)
    assert "discarded" in (node.series()[series_uid].reason or "")
    assert _spooled(node.out) == []
    node.close()


def test_port_in_use_and_second_node_on_a_folder_are_clear_errors(
        tmp_path: Path, start_node: Callable[..., RunningNode]) -> None:
    from medseg.errors import OutputError
    from medseg.node.service import Node

    node = start_node(tmp_path / "out")
    busy = Node(NodeConfig(out_dir=str(tmp_path / "other"), port=node.port, host="127.0.0.1",
                           allow=["SENDER"], method="threshold"))
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{node.port}"):
        busy.start()
    same = Node(NodeConfig(out_dir=str(tmp_path / "out"), port=0, host="127.0.0.1",
                           allow=["SENDER"], method="threshold"))
    with pytest.raises(OutputError, match="another 'medseg listen'"):
        same.start()
    node.close()


def test_command_line_errors_name_the_problem(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.cli import main

    assert main(["listen", "-o", str(tmp_path / "out")]) == 1
    assert "--allow" in capsys.readouterr().err
    config = tmp_path / "node.yaml"
    config.write_text("job: listen\nout_dir: out\nallow: [ORTHANC]\nsend_too: X@h:1\n")
    assert main(["run", str(config)]) == 1
    err = capsys.readouterr().err
    assert str(config) in err and "send_too" in err and "send_to" in err
    with pytest.raises(SystemExit):
        main(["listen", "-o", "x", "--port", "70000", "--allow-any"])
    assert "0-65535" in capsys.readouterr().err


def test_a_failing_pass_is_logged_and_the_node_goes_on(
        tmp_path: Path, start_node: Callable[..., RunningNode],
        phantom_series: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "RETRY_PASS_S", 0.2)
    calls = []
    real = service.Node._select

    def flaky(self: service.Node, now: float) -> object:
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return real(self, now)

    monkeypatch.setattr(service.Node, "_select", flaky)
    node = start_node(tmp_path / "out")
    src = phantom_series(1)
    send_series(node.port, src)
    wait_for("the study done", lambda: _done(node, uids(src)[0]))
    assert any("simulated failure" in m and m.startswith("error:") for m in node.logs)
    node.close()
