"""Importing logged bandit data from other systems (CSV / Parquet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tuning.importer import LogImportError, import_log
from tuning.ope import SNIPS

HEADER = "event_id,timestamp,action,chosen,pscore,reward,ctx_hour,act_len"
ROWS = [
    "e1,2026-01-01T10:00:00Z,a,1,0.5,1,0.3,2",
    "e1,2026-01-01T10:00:00Z,b,0,,,0.3,5",
    "e0,2026-01-01T09:00:00Z,a,0,0.2,,0.1,1",
    "e0,2026-01-01T09:00:00Z,b,0,0.3,,0.1,1",
    "e0,2026-01-01T09:00:00Z,c,1,0.5,0,0.1,3",
]


def write(tmp_path: Path, rows: list[str], header: str = HEADER) -> Path:
    path = tmp_path / "log.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_a_csv_log_becomes_a_time_ordered_bandit_log(tmp_path: Path) -> None:
    imported = import_log(write(tmp_path, ROWS))
    log = imported.log
    # e0 is earlier, so it comes first although the file lists it second.
    assert log.event_id.tolist() == ["e0", "e1"]
    assert log.offsets.tolist() == [0, 3, 5]
    assert log.chosen.tolist() == [2, 0] and log.reward.tolist() == [0.0, 1.0]
    # e1 gives only the chosen probability: the remaining mass is spread evenly.
    np.testing.assert_allclose(log.pscore, [0.2, 0.3, 0.5, 0.5, 0.5])
    assert imported.feature_names == (
        "hour*action=a",
        "hour*action=b",
        "hour*action=c",
        "len",
    )
    np.testing.assert_allclose(log.X[2], [0.0, 0.0, 0.1, 3.0])  # e0, action c
    np.testing.assert_allclose(log.X[4], [0.0, 0.3, 0.0, 5.0])  # e1, action b
    assert imported.spec_version.startswith("import-")
    # Estimators accept it as is.
    assert SNIPS().estimate(log, log.pscore).n_events == 2


def test_parquet_and_csv_give_the_same_log(tmp_path: Path) -> None:
    csv = import_log(write(tmp_path, ROWS))
    frame = pd.read_csv(tmp_path / "log.csv")
    frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    frame.to_parquet(tmp_path / "log.parquet")
    parquet = import_log(tmp_path / "log.parquet")
    assert parquet.spec_version == csv.spec_version
    for name in ("X", "offsets", "pscore", "chosen", "reward", "event_id", "timestamp"):
        np.testing.assert_array_equal(getattr(parquet.log, name), getattr(csv.log, name))


def test_joint_features_and_unix_seconds_are_taken_as_given(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        ["a,100,1,0.25,1,1.5,2", "a,100,0,0.75,,0.5,1", "b,50,1,1.0,0,3,4"],
        header="event_id,timestamp,chosen,pscore,reward,x_f1,x_f2",
    )
    imported = import_log(path)
    assert imported.feature_names == ("f1", "f2")
    assert imported.log.event_id.tolist() == ["b", "a"]
    np.testing.assert_array_equal(imported.log.X, [[3, 4], [1.5, 2], [0.5, 1]])


def test_without_action_ids_context_is_crossed_with_candidate_features(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        ["a,100,1,0.5,1,2,3", "a,100,0,0.5,,2,5"],
        header="event_id,timestamp,chosen,pscore,reward,ctx_c,act_a",
    )
    imported = import_log(path)
    assert imported.feature_names == ("c*a", "a")
    np.testing.assert_array_equal(imported.log.X, [[6, 3], [10, 5]])


@pytest.mark.parametrize(
    ("row", "replacement", "message"),
    [
        (1, "e1,2026-01-01T10:00:00Z,b,0,,,0.3,five", r"row 2 \(line 3\), column 'act_len'"),
        (0, "e1,yesterday,a,1,0.5,1,0.3,2", r"row 1 \(line 2\), column 'timestamp'"),
        (1, "e1,2026-01-01T11:00:00Z,b,0,,,0.3,5", r"row 2 \(line 3\), column 'timestamp'"),
        (0, "e1,2026-01-01T10:00:00Z,a,2,0.5,1,0.3,2", r"row 1 \(line 2\), column 'chosen'"),
        (1, "e1,2026-01-01T10:00:00Z,b,1,0.5,1,0.3,5", r"row 2 \(line 3\), column 'chosen'.*2"),
        (0, "e1,2026-01-01T10:00:00Z,a,1,,1,0.3,2", r"row 1 \(line 2\), column 'pscore'.*chosen"),
        (0, "e1,2026-01-01T10:00:00Z,a,1,1.5,1,0.3,2", r"row 1 \(line 2\), column 'pscore'"),
        (0, "e1,2026-01-01T10:00:00Z,a,1,0,1,0.3,2", r"row 1 \(line 2\), column 'pscore'.*> 0"),
        (0, "e1,2026-01-01T10:00:00Z,a,1,0.5,,0.3,2", r"row 1 \(line 2\), column 'reward'"),
        (1, "e1,2026-01-01T10:00:00Z,b,0,,,0.9,5", r"row 2 \(line 3\), column 'ctx_hour'"),
        (1, "e1,2026-01-01T10:00:00Z,a,0,,,0.3,5", r"row 2 \(line 3\), column 'action'"),
        (3, "e0,2026-01-01T09:00:00Z,b,0,0.6,,0.1,1", r"row 3 \(line 4\), column 'pscore'.*sum"),
        (3, "e0,2026-01-01T09:00:00Z,b,0,,,0.1,1", r"row 3 \(line 4\), column 'pscore'.*2 of"),
        (2, ",2026-01-01T09:00:00Z,a,0,0.2,,0.1,1", r"row 3 \(line 4\), column 'event_id'"),
    ],
)
def test_malformed_rows_name_the_row_and_column(
    tmp_path: Path, row: int, replacement: str, message: str
) -> None:
    rows = list(ROWS)
    rows[row] = replacement
    with pytest.raises(LogImportError, match=message):
        import_log(write(tmp_path, rows))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("event_id,timestamp,action,chosen,pscore,ctx_hour,act_len", r"missing.*'reward'"),
        ("event_id,timestamp,action,chosen,pscore,reward,hour,act_len", r"unknown.*'hour'"),
        ("event_id,timestamp,action,chosen,pscore,reward,ctx_hour,x_len", r"cannot be mixed"),
    ],
)
def test_malformed_headers_name_the_column(tmp_path: Path, header: str, message: str) -> None:
    with pytest.raises(LogImportError, match=message):
        import_log(write(tmp_path, ROWS, header=header))


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(LogImportError, match="no such file"):
        import_log(tmp_path / "missing.csv")
    (tmp_path / "log.json").write_text("{}", encoding="utf-8")
    with pytest.raises(LogImportError, match=r"\.csv or \.parquet"):
        import_log(tmp_path / "log.json")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(LogImportError, match="cannot be read as parquet"):
        import_log(tmp_path / "bad.parquet")
    with pytest.raises(LogImportError, match="no rows"):
        import_log(write(tmp_path, []))
