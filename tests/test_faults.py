"""The fault matrix of `benchmarks/faults.py`, run as tests.

The fast classes run in the default test command: malformed inputs, numeric
faults (NaN/Inf at a mask update, mixed_float16 overflow, TerminateOnNaN),
storage faults (ENOSPC/EIO injected into the writers), a reader racing a
writer, and bad serving requests in a fresh process. The kill campaign runs
a few aimed SIGKILLs here (marked slow) and the full seeded campaign in the
benchmark. The benchmark and these tests share one implementation of each
fault, so the published table and the tests cannot drift apart.
"""

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import faults  # noqa: E402


def failed(records):
    return [r for r in records if not r.get("ok")]


def test_malformed_inputs_raise_clear_errors(tmp_path):
    rows, records = faults.inputs_faults(tmp_path)
    assert len(records) >= 25
    assert failed(records) == []
    for record in records:
        assert record["error"] in (
            "ValueError", "TypeError", "FileNotFoundError", "PermissionError")
        assert record["tf_frames"] == 0
    assert all(row["lost"] == 0 for row in rows)


def test_check_error_notices_a_vague_error():
    """The checker itself fails a message that lacks the value."""
    def vague():
        raise ValueError("bad argument")

    record = faults.check_error(vague, ["sparsity", "1.5"])
    assert not record["ok"] and record["missing"] == ["sparsity", "1.5"]
    assert not faults.check_error(lambda: None, ["x"])["ok"]


@pytest.mark.parametrize("what", ["nan inputs", "inf inputs", "nan labels", "inf labels"])
@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_non_finite_batch_at_a_mask_update(what, grow):
    facts = faults.update_step_fault(what, grow)
    assert facts["problems"] == []
    assert facts["counts_exact"]
    assert facts["grown_nan"] == 0
    assert facts["inactive_nonzero"] == 0
    assert facts["updates_run"] == 1  # the due update ran, once
    assert facts["masks_changed"]


@pytest.mark.parametrize("overflow_batch", [1, 2])
def test_overflow_under_mixed_float16_defers_the_update_to_the_next_step(
        overflow_batch):
    result = faults.overflow_fault((overflow_batch,))
    trace = result["trace"]
    assert result["optimizer"] == "LossScaleOptimizer"
    steps = [t["applied_steps"] for t in trace]
    # The overflowing batch is skipped: it does not count as a step...
    assert steps[overflow_batch] == steps[overflow_batch - 1]
    assert trace[overflow_batch]["loss_scale"] < trace[overflow_batch - 1]["loss_scale"]
    # ...and the mask updates (due at applied steps 2, 4, ...) each run once,
    # on the first applied step with their number.
    due = [sum(1 for s in range(n) if s >= 2 and s % 2 == 0) for n in steps]
    assert [t["mask_updates"] for t in trace] == due
    assert due[-1] >= 2
    for t in trace:
        assert t["counts_exact"] and t["problems"] == [] and t["nan_weights"] == 0


@pytest.mark.parametrize("nan_epoch", [1, 2])
def test_terminate_on_nan_beside_edst_and_backup(tmp_path, nan_epoch):
    facts = faults.terminate_on_nan_fault(tmp_path, nan_epoch)
    assert facts["epochs_run"] == list(range(nan_epoch + 1))
    assert facts["backup_epoch"] == nan_epoch  # the last finite state is kept
    assert facts["backup_finite"]
    assert facts["nan_members"] == []


def test_storage_faults_keep_old_files_and_say_what_failed(tmp_path):
    rows, records = faults.storage_faults(tmp_path)
    assert len(rows) >= 9
    assert failed(records) == []
    for row in rows:
        assert row["lost"] == 0 and row["half_written"] == 0, row
    for record in records:
        assert "Could not" in record["error"]


def test_readers_see_only_complete_members(tmp_path):
    rows, records = faults.concurrency_faults(tmp_path, processes=False)
    assert failed(records) == []
    race = records[0]
    assert race["reads"] > 0 and race["torn"] == 0 and race["errors"] == 0
    assert "waiting for member 1" in records[1]["message"]


def test_bad_serving_requests_in_a_fresh_process(tmp_path):
    rows, records = faults.serving_faults(tmp_path, cli=False)
    assert failed(records) == []
    names = {r["fault"] for r in records}
    assert set(faults.EXPECTED_SERVING) <= names
    imports = next(r for r in records if r["fault"] == "imports")
    assert imports["keras_freetickets_imported"] is False


@pytest.mark.slow
def test_aimed_kills_resume_bit_for_bit(tmp_path):
    """SIGKILL inside a backup write, inside a member save and inside the
    export of an EDST run; each restart must end with the uninterrupted
    run's members and export, and nothing left over."""
    references = {"edst": faults.reference("edst", tmp_path, 300)}
    occurrences = references["edst"]["profile"]["occurrences"]
    assert {o["window"] for o in occurrences} >= set(faults.WINDOWS)
    backup = next(o for o in occurrences if o["window"] == "backup" and o["occurrence"] == 4)
    plans = [
        dict(trial=0, scenario="edst", kind="window", plan=dict(
            window="backup", occurrence=4, mode="op", op=backup["ops"] // 2)),
        dict(trial=1, scenario="edst", kind="window", plan=dict(
            window="member_save", occurrence=2, mode="op", op=3)),
        dict(trial=2, scenario="edst", kind="window", plan=dict(
            window="export", occurrence=1, mode="op", op=2)),
    ]
    for plan in plans:
        record = faults.kill_trial(plan, tmp_path, references, 300)
        assert record["killed"], record
        assert record["landed"] == f"inside {plan['plan']['window']}", record
        assert record["completed"], record
        assert record["members_equal"] and record["export_outputs_equal"], record
        assert record["export_files_equal"], record
        assert record["leftovers"] == [], record


def test_next_write_removes_what_a_killed_write_left(tmp_path):
    """A SIGKILL inside a member save or an export leaves a temporary file
    or folder; the next write of the same path removes it (the kill
    campaign found these left over)."""
    import os

    from keras_freetickets import export as export_lib
    from keras_freetickets import members as members_lib

    model = faults._small()
    path = members_lib.member_path(tmp_path / "members", 0)
    os.makedirs(tmp_path / "members")
    stale = tmp_path / "members" / ".member_0.kftm.0badc0de.tmp"
    stale.write_bytes(b"PK\x03")
    other = tmp_path / "members" / ".member_1.kftm.0badc0de.tmp"
    other.write_bytes(b"PK\x03")
    members_lib.save_member(model, path)
    assert not stale.exists()
    assert other.exists()  # another member's write is left alone

    export = tmp_path / "serving" / "1"
    os.makedirs(tmp_path / "serving" / ".1.tmp-killed" / "variables")
    faults.export_tiny(export)
    assert sorted(os.listdir(tmp_path / "serving")) == ["1"]
    # Killed between the two renames of the fallback overwrite: the old
    # export is aside and `path` is missing; it is put back first.
    os.rename(export, tmp_path / "serving" / ".1.old-killed")
    export_lib._recover_killed_export(str(tmp_path / "serving"), "1")
    assert sorted(os.listdir(tmp_path / "serving")) == ["1"]
    assert (export / "saved_model.pb").exists()
