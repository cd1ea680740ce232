"""Completion records (gradlake.stages.records): written last, found afresh, told apart by settings."""

from __future__ import annotations

from gradlake import fsio
from gradlake.stages.records import Records, other_settings


def test_records_are_found_by_name_and_a_temp_file_is_none(tmp_path):
    folder = fsio.Folder(str(tmp_path))
    records = Records(folder, "exact/done", "mb-")
    assert records.load() == {}
    records.write("000001", {"settings": "a", "minibatch": 1})
    records.write("000000", {"settings": "a", "minibatch": 0})
    (tmp_path / "exact" / "done" / ".tmp-0a1b.json").write_text("{")  # a killed write's temp file
    (tmp_path / "exact" / "done" / "other.json").write_text("{}")  # not this prefix
    found = records.load()
    assert found == {"000000": {"settings": "a", "minibatch": 0}, "000001": {"settings": "a", "minibatch": 1}}
    assert not other_settings(found, "a") and other_settings(found, "b")
    records.remove("000001")
    assert list(records.load()) == ["000000"]
    per_checkpoint = Records(folder, "done")
    per_checkpoint.write("epoch-0001", {"settings": "a"})
    (tmp_path / "done" / ".tmp-0a1b.json").write_text("{")
    assert per_checkpoint.load() == {"epoch-0001": {"settings": "a"}}
