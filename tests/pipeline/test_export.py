"""``densepure export`` (all groups, per group, full precision, Cohen rounding) and ``report --acr``."""

from __future__ import annotations

import math

import datetime
import io
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli.runs import export, report
from pipeline.formats import group_file_name
from tests.pipeline.test_analysis import _row, known_table, write_run


def _invoke(cmd, args: list[str]):
    return CliRunner().invoke(cmd, args, catch_exceptions=False)


def cohen_certify_lines(rows: pd.DataFrame) -> str:
    """What Cohen et al.'s certify.py prints for these rows (its print statements, transcribed)."""
    out = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for r in rows.sort_values("image_id").itertuples(index=False):
        correct = int(r.prediction == r.label)
        time_elapsed = str(datetime.timedelta(seconds=float(r.seconds)))
        out.append("{}\t{}\t{}\t{:.3}\t{}\t{}".format(r.image_id, r.label, r.prediction, float(r.radius), correct, time_elapsed))
    return "\n".join(out) + "\n"


def precise_table() -> pd.DataFrame:
    """known_table with radii that {:.3} would round."""
    df = known_table()
    df["radius"] = df["radius"] * 1.0123456789
    return df


def test_export_writes_every_group_by_default_at_full_precision(tmp_path: Path) -> None:
    df = precise_table()
    run = write_run(tmp_path / "run", df)
    out = tmp_path / "all.tsv"
    result = _invoke(export, [run, "--tsv", str(out)])
    assert result.exit_code == 0, result.output
    back = pd.read_csv(out, sep="\t")
    assert list(back.columns) == ["sigma", "method", "votes", "steps", "idx", "label", "predict", "radius", "correct", "time"]
    assert len(back) == len(df) and f"wrote {len(df)} rows to {out}" in result.stderr
    merged = back.merge(df, left_on=["sigma", "method", "votes", "steps", "idx"],
                        right_on=["sigma", "method", "votes", "steps", "image_id"])
    assert len(merged) == len(df)
    assert (merged["radius_x"] == merged["radius_y"]).all()  # exactly the stored floats
    assert (merged["predict"] == merged["prediction"]).all()


def test_export_per_group_writes_one_cohen_file_per_group(tmp_path: Path) -> None:
    df = precise_table()
    run = write_run(tmp_path / "run", df)
    folder = tmp_path / "tsv"  # created: its parent exists
    result = _invoke(export, [run, "--per-group", str(folder), "--cohen-rounding"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["cohen_sigma0.25_K1_b0.tsv", "cohen_sigma0.5_K1_b0.tsv",
                            "densepure_sigma0.25_K1_b2.tsv", "densepure_sigma0.25_K3_b2.tsv"])
    for (sigma, method, votes, steps), rows in df.groupby(["sigma", "method", "votes", "steps"]):
        text = (folder / group_file_name((sigma, method, votes, steps))).read_text()
        assert text == cohen_certify_lines(rows)  # byte for byte what certify.py writes
    narrowed = tmp_path / "dp"
    assert _invoke(export, [run, "--per-group", str(narrowed), "--method", "densepure"]).exit_code == 0
    assert len(list(narrowed.iterdir())) == 2


def test_one_group_by_the_selection_flags(tmp_path: Path) -> None:
    df = precise_table()
    run = write_run(tmp_path / "run", df)
    out = tmp_path / "one.tsv"
    assert _invoke(export, [run, "--tsv", str(out), "--method", "densepure", "--votes", "3", "--cohen-rounding"]).exit_code == 0
    rows = df[(df["method"] == "densepure") & (df["votes"] == 3)]
    assert out.read_text() == cohen_certify_lines(rows)
    full = _invoke(export, [run, "--tsv", str(out), "--method", "densepure", "--votes", "3"])
    assert full.exit_code == 0
    back = pd.read_csv(out, sep="\t")
    assert list(back["radius"]) == list(rows.sort_values("image_id")["radius"])


def test_export_needs_exactly_one_destination(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", known_table())
    for args in ([run], [run, "--tsv", str(tmp_path / "a.tsv"), "--per-group", str(tmp_path / "d")]):
        result = CliRunner().invoke(export, args)
        assert result.exit_code == 2 and "exactly one of --tsv" in result.output


def test_report_acr_column(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", known_table())
    result = _invoke(report, [run, "--radii", "0", "0.5", "--format", "csv", "--acr"])
    assert result.exit_code == 0, result.output
    back = pd.read_csv(io.StringIO(result.stdout))
    assert list(back.columns) == ["method", "sigma", "K", "steps", "0", "0.5", "acr"]
    def acr(method: str, sigma: str, k: int) -> float:
        return float(back[(back["method"] == method) & (back["sigma"] == sigma) & (back["K"] == k)]["acr"].iloc[0])
    # Hand counts from known_table: certified-correct radii / 4 images.
    assert acr("cohen", "0.25", 1) == pytest.approx((0.6 + 0.2) / 4)
    assert acr("cohen", "0.5", 1) == pytest.approx((1.0 + 0.3 + 0.0) / 4)
    assert math.isnan(acr("cohen", "best", 1))  # a best row has no ACR of its own
    assert acr("densepure", "0.25", 3) == pytest.approx((0.7 + 0.25 + 0.5) / 4)
    md = _invoke(report, [run, "--radii", "0", "--acr"]).stdout.splitlines()
    assert md[0] == "| method | sigma | K | steps | r=0 | ACR |"
    assert "| cohen | 0.25 | 1 | 0 | 0.500 | 0.200 |" in md
    latex = _invoke(report, [run, "--radii", "0", "--acr", "--format", "latex"]).stdout
    assert "$r=0$ & ACR" in latex
    plain = _invoke(report, [run, "--radii", "0"]).stdout
    assert "ACR" not in plain


def test_report_acr_of_several_runs(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", known_table())
    b = write_run(tmp_path / "b", pd.DataFrame([_row(0, 0.25, "cohen", 1, 0, 2.0, "ok")]),
                  config={"methods": ["cohen"], "sigmas": [0.25]})
    result = _invoke(report, [a, b, "--radii", "0", "--format", "csv", "--acr"])
    assert result.exit_code == 0, result.output
    back = pd.read_csv(io.StringIO(result.stdout))
    assert float(back[(back["run"] == b)]["acr"].iloc[0]) == 2.0
