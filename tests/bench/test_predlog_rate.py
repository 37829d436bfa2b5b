"""bench.predlog_rate: a smoke run against its own Postgres (every row reaches the table, the
figures are reported), and its arguments refused with the field named."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bench import predlog_rate


@pytest.mark.parametrize("policy", ["full", "digest"])
def test_a_small_run_writes_every_row_and_reports_its_rate(tmp_path: Path, policy: str) -> None:
    out = tmp_path / "rate.json"
    argv = ["--rows", "200", "--in-bytes", "256", "--out-bytes", "16", "--policy", policy,
            "--window", "50", "--fast-postgres", "--out", str(out)]
    assert predlog_rate.main(argv) == 0
    report = orjson.loads(out.read_bytes())
    assert report["rows_in_table"] == report["rows"] == 200 and report["dropped"] == 0
    assert report["policy"] == policy
    for figure in ("rows_per_s", "raw_mb_per_s", "stored_bytes_per_row", "wal_bytes_per_row"):
        assert report[figure] > 0, figure
    # CPU is counted in 10 ms clock ticks: 200 small rows may take less than one.
    for figure in ("writer_cpu_s_per_1000", "postgres_cpu_s_per_1000"):
        assert report[figure] >= 0, figure


@pytest.mark.parametrize(("argv", "field"), [
    (["--in-bytes", "10"], "--in-bytes"),
    (["--out-bytes", "0"], "--out-bytes"),
    (["--policy", "none"], "--policy"),
    (["--rows", "0"], "--rows"),
])  # fmt: skip
def test_bad_arguments_are_refused_naming_the_field(
    argv: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        predlog_rate.parse_args(argv)
    assert exited.value.code == 2
    assert field in capsys.readouterr().err
