"""Tests of pipeline.analysis and the report/status/export commands on hand-built run folders."""

from __future__ import annotations

import dataclasses
import io
import json
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scipy.stats import norm

from pipeline.analysis import (
    PartialRunWarning,
    average_certified_radius,
    best_over_sigma,
    certified_accuracy,
    export_tsv,
    format_table,
    load_run,
    load_runs,
    plot_certified_accuracy,
    select_group,
    to_cohen_tsv,
)
from workers.errors import UserError
from pipeline.cli.runs import _gather_radii, export, parse_radii, report, status
from pipeline.config import RunConfig
from pipeline.manifest import VERSION as MANIFEST_VERSION
from pipeline.stats import lower_confidence_bound
from pipeline.status import format_status, run_status

RADII = [0.0, 0.25, 0.5, 0.75]


def _row(image_id: int, sigma: float, method: str, votes: int, steps: int, radius: float, outcome: str, seconds: float = 1.5) -> dict[str, Any]:
    """One certification row; outcome is 'ok' (correct), 'wrong' or 'abstain'."""
    label = image_id % 10
    abstain = outcome == "abstain"
    prediction = -1 if abstain else (label if outcome == "ok" else (label + 1) % 10)
    return {
        "image_id": image_id, "label": label, "sigma": sigma, "method": method, "votes": votes, "steps": steps,
        "n0": 100, "n": 1000, "alpha": 0.001, "prediction": prediction, "count": 900, "p_lower": 0.9,
        "radius": 0.0 if abstain else radius, "correct": outcome == "ok", "abstain": abstain,
        "seconds": seconds, "unet_forwards": 10, "classifier_calls": 5, "t_star": 12.0,
    }


def known_table() -> pd.DataFrame:
    """Two cohen sigmas and one densepure sigma with two vote counts; expected values in the tests."""
    rows = [
        # cohen sigma 0.25: certified radii {0.6, 0.2}, one wrong, one abstain.
        _row(0, 0.25, "cohen", 1, 0, 0.6, "ok"),
        _row(1, 0.25, "cohen", 1, 0, 0.2, "ok"),
        _row(2, 0.25, "cohen", 1, 0, 0.9, "wrong"),
        _row(3, 0.25, "cohen", 1, 0, 0.0, "abstain"),
        # cohen sigma 0.5: certified radii {1.0, 0.3, 0.0}, one wrong.
        _row(0, 0.5, "cohen", 1, 0, 1.0, "ok"),
        _row(1, 0.5, "cohen", 1, 0, 0.3, "ok"),
        _row(2, 0.5, "cohen", 1, 0, 0.0, "ok"),
        _row(3, 0.5, "cohen", 1, 0, 0.8, "wrong"),
        # densepure sigma 0.25, K=1 and K=3 (b=2).
        _row(0, 0.25, "densepure", 1, 2, 0.1, "ok"),
        _row(1, 0.25, "densepure", 1, 2, 0.0, "abstain"),
        _row(2, 0.25, "densepure", 1, 2, 0.5, "ok"),
        _row(3, 0.25, "densepure", 1, 2, 0.5, "wrong"),
        _row(0, 0.25, "densepure", 3, 2, 0.7, "ok"),
        _row(1, 0.25, "densepure", 3, 2, 0.25, "ok"),
        _row(2, 0.25, "densepure", 3, 2, 0.5, "ok"),
        _row(3, 0.25, "densepure", 3, 2, 0.0, "abstain"),
    ]
    return pd.DataFrame(rows)


EXPECTED = {
    ("cohen", 0.25, 1, 0): [2 / 4, 1 / 4, 1 / 4, 0.0],
    ("cohen", 0.5, 1, 0): [3 / 4, 2 / 4, 1 / 4, 1 / 4],
    ("densepure", 0.25, 1, 2): [2 / 4, 1 / 4, 1 / 4, 0.0],
    ("densepure", 0.25, 3, 2): [3 / 4, 3 / 4, 2 / 4, 0.0],
}


def write_run(root: Path, table: pd.DataFrame | None, status: str = "complete", units: list[dict] | None = None, **manifest: Any) -> str:
    """A run folder written with plain json / pandas / pyarrow, as the pipeline lays it out."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"methods": ["cohen", "densepure"], "sigmas": [0.25, 0.5], "votes": [1, 3], "steps": 2,
              "n0": 100, "n": 1000, "alpha": 0.001, "data": "cifar10"}
    config = RunConfig(out=str(root), **{**config, **manifest.pop("config", {})}).to_dict()
    doc = {"format": "densepure-run", "version": MANIFEST_VERSION, "run_id": root.name, "status": status, "config": config, "units_total": 8, "units_done": 8,
           "images_total": 4, "cost": {"gpu_seconds": 24.0, "unet_forwards": 160, "classifier_calls": 80, "draws": 4400},
           "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T01:00:00Z", "error": None}
    doc.update(manifest)
    (root / "manifest.json").write_text(json.dumps(doc))
    if table is not None:
        table.to_parquet(root / "certification.parquet", index=False)
    if units:
        (root / "units").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(units, schema=UNIT_SCHEMA), root / "units" / "part-000000.parquet")
    return str(root)


UNIT_SCHEMA = pa.schema([
    ("unit_id", pa.string()), ("image_id", pa.int64()), ("label", pa.int64()), ("sigma", pa.float64()),
    ("method", pa.string()), ("steps", pa.int64()), ("phase", pa.string()), ("start", pa.int64()),
    ("num_draws", pa.int64()), ("votes", pa.list_(pa.int64())), ("counts", pa.list_(pa.list_(pa.int64()))),
    ("t_star", pa.float64()), ("seconds", pa.float64()), ("unet_forwards", pa.int64()),
    ("classifier_calls", pa.int64()), ("votes_computed", pa.int64()), ("votes_skipped", pa.int64()),
    ("worker", pa.string()), ("engine", pa.string()), ("finished_at", pa.float64()),
])


def _unit(uid: str, image: int, phase: str, start: int, draws: int, counts: list[int], seconds: float, finished: float, worker: str,
          engine: str = "cuda bf16 batch 256") -> dict:
    return {"unit_id": uid, "image_id": image, "label": 1, "sigma": 0.25, "method": "cohen", "steps": 0,
            "phase": phase, "start": start, "num_draws": draws, "votes": [1], "counts": [counts], "t_star": 0.0,
            "seconds": seconds, "unet_forwards": 0, "classifier_calls": draws, "votes_computed": draws, "votes_skipped": 0,
            "worker": worker, "engine": engine,
            "finished_at": finished}


PARTIAL_CONFIG = {"methods": ["cohen"], "sigmas": [0.25], "votes": [1], "steps": 0, "n0": 10, "n": 100, "alpha": 0.001,
                  "chunk": 50}


def partial_units() -> list[dict]:
    """Image 0 fully certified (all 100 estimation votes for class 1); image 1 has only its selection."""
    return [
        _unit("i0-sel", 0, "select", 0, 10, [0, 10, 0], 10.0, 100.0, "w1"),
        _unit("i0-est-0", 0, "estimate", 0, 50, [0, 50, 0], 10.0, 110.0, "w1"),
        _unit("i0-est-50", 0, "estimate", 50, 50, [0, 50, 0], 10.0, 120.0, "w2"),
        # A worker on another kind of GPU: a different automatic batch size.
        _unit("i1-sel", 1, "select", 0, 10, [10, 0, 0], 5.0, 130.0, "w2", engine="cuda bf16 batch 96"),
    ]


def partial_run(tmp_path: Path) -> str:
    run = write_run(tmp_path / "partial", None, status="running", units=partial_units(), config=PARTIAL_CONFIG,
                    units_total=6, units_done=3, images_total=2)
    # A live driver's lease (heartbeat now): without one, status calls the run stale.
    now = time.time()
    (Path(run) / "lock.json").write_text(json.dumps({
        "format": "densepure-lock", "host": "node-1", "pid": 4242, "run_id": "partial", "token": "t" * 32,
        "started_at": now - 60, "heartbeat_at": now, "stale_after_s": 120.0,
    }))
    return run


# --------------------------------------------------------------------------- metrics


def test_certified_accuracy_matches_hand_counts() -> None:
    acc = certified_accuracy(known_table(), RADII)
    assert list(acc.columns) == RADII
    assert list(acc.index.names) == ["method", "sigma", "votes", "steps"]
    for key, values in EXPECTED.items():
        assert acc.loc[key].tolist() == pytest.approx(values)


def test_certified_accuracy_counts_abstain_as_wrong_even_if_flagged_correct() -> None:
    df = pd.DataFrame([_row(0, 0.25, "cohen", 1, 0, 0.0, "abstain"), _row(1, 0.25, "cohen", 1, 0, 0.0, "ok")])
    df.loc[0, "correct"] = True  # inconsistent row: abstention must still not count
    acc = certified_accuracy(df, [0.0])
    assert acc.iloc[0, 0] == pytest.approx(0.5)


def test_certified_accuracy_confidence_is_clopper_pearson_lower_bound() -> None:
    acc = certified_accuracy(known_table(), RADII, confidence=0.95)
    point = certified_accuracy(known_table(), RADII)
    for key, values in EXPECTED.items():
        expected = [lower_confidence_bound(round(v * 4), 4, 0.05) for v in values]
        assert acc.loc[key].tolist() == pytest.approx(expected)
        assert all(a <= p for a, p in zip(acc.loc[key], point.loc[key]))
    with pytest.raises(UserError, match="confidence must lie"):
        certified_accuracy(known_table(), RADII, confidence=1.0)


def test_certified_accuracy_rejects_negative_radius() -> None:
    with pytest.raises(UserError, match="radii"):
        certified_accuracy(known_table(), [0.0, -0.5])


def test_best_over_sigma_is_envelope() -> None:
    naive = best_over_sigma(known_table(), RADII, union_bound=False)
    assert naive.loc[("cohen", 1, 0)].tolist() == pytest.approx([3 / 4, 2 / 4, 1 / 4, 1 / 4])
    assert naive.loc[("densepure", 3, 2)].tolist() == pytest.approx(EXPECTED[("densepure", 0.25, 3, 2)])
    # Union-bounded: the two cohen sigmas are compared on their certificates recomputed at alpha / 2;
    # densepure has one sigma, so nothing changes there.
    from pipeline.metrics import recertify

    best = best_over_sigma(known_table(), RADII)
    cohen = known_table()[lambda d: d["method"] == "cohen"]
    want = best_over_sigma(recertify(cohen, 2), RADII, union_bound=False)
    assert best.loc[("cohen", 1, 0)].tolist() == want.loc[("cohen", 1, 0)].tolist()
    assert best.loc[("densepure", 3, 2)].tolist() == naive.loc[("densepure", 3, 2)].tolist()
    assert best.attrs["m"][("cohen", 1, 0)] == 2


def test_recertify_recomputes_each_bound_at_alpha_over_m() -> None:
    from scipy.stats import norm

    from pipeline.metrics import recertify

    table = known_table()
    table["p_lower"] = [lower_confidence_bound(900, 1000, 0.001)] * len(table)
    again = recertify(table, 3)
    p = lower_confidence_bound(900, 1000, 0.001 / 3)
    certified = ~table["abstain"]
    assert again.loc[certified, "p_lower"].tolist() == pytest.approx([p] * int(certified.sum()))
    assert again.loc[certified, "radius"].tolist() == pytest.approx(list(table.loc[certified, "sigma"] * norm.ppf(p)))
    assert again["abstain"].tolist() == table["abstain"].tolist()  # abstentions stay abstentions
    pd.testing.assert_frame_equal(recertify(table, 1), table)


def test_average_certified_radius() -> None:
    acr = average_certified_radius(known_table())
    assert acr[("cohen", 0.25, 1, 0)] == pytest.approx((0.6 + 0.2) / 4)
    assert acr[("cohen", 0.5, 1, 0)] == pytest.approx((1.0 + 0.3 + 0.0) / 4)
    assert acr[("densepure", 0.25, 3, 2)] == pytest.approx((0.7 + 0.25 + 0.5) / 4)
    assert average_certified_radius(known_table(), by=()).iloc[0] == pytest.approx(
        (0.8 + 1.3 + 0.6 + 1.45) / 16
    )


# --------------------------------------------------------------------------- TSV


def test_to_cohen_tsv_format() -> None:
    df = pd.DataFrame([
        _row(7, 0.5, "cohen", 1, 0, 1.23456, "ok", seconds=1.234567),
        _row(3, 0.5, "cohen", 1, 0, 0.0, "abstain", seconds=61.0),
        _row(5, 0.5, "cohen", 1, 0, 0.123456, "wrong", seconds=0.0),
    ])
    lines = to_cohen_tsv(df, cohen_rounding=True).splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    assert lines[1] == "3\t3\t-1\t0.0\t0\t0:01:01"
    assert lines[2] == "5\t5\t6\t0.123\t0\t0:00:00"
    assert lines[3] == "7\t7\t7\t1.23\t1\t0:00:01.234567"
    # By default the radius keeps full precision.
    assert to_cohen_tsv(df).splitlines()[3] == "7\t7\t7\t1.23456\t1\t0:00:01.234567"
    # Reads back like Cohen's analyze.py does.
    back = pd.read_csv(io.StringIO(to_cohen_tsv(df)), delimiter="\t")
    assert list(back["idx"]) == [3, 5, 7] and list(back["correct"]) == [0, 0, 1]


def test_to_cohen_tsv_requires_one_group() -> None:
    with pytest.raises(UserError) as info:
        to_cohen_tsv(known_table())
    msg = str(info.value)
    assert "4 groups" in msg and "--sigma 0.5 --method cohen --votes 1 --steps 0" in msg and "\n" not in msg
    rows = select_group(known_table(), method="densepure", votes=3)
    assert len(rows) == 4
    with pytest.raises(UserError, match="no rows match"):
        select_group(known_table(), sigma=1.0)


def test_export_tsv_writes_file(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", known_table())
    out = tmp_path / "out.tsv"
    assert export_tsv(run, str(out), sigma=0.25, method="cohen") == 4
    text = out.read_text()
    assert text.splitlines()[1] == "0\t0\t0\t0.6\t1\t0:00:01.500000"


# --------------------------------------------------------------------------- tables


def _with_best(fmt: str, **kw: Any) -> str:
    from pipeline.metrics import best_over

    best = best_over(known_table(), RADII, over=("sigma",), union_bound=False)
    best = best.iloc[[i for i, m in enumerate(best.attrs["m"].values()) if m > 1]]
    return format_table(certified_accuracy(known_table(), RADII), fmt, best=best, **kw)


def test_format_table_markdown() -> None:
    text = _with_best("markdown")
    lines = text.splitlines()
    assert lines[0] == "| method | sigma | K | steps | r=0 | r=0.25 | r=0.5 | r=0.75 |"
    assert "| cohen | 0.25 | 1 | 0 | 0.500 | 0.250 | 0.250 | 0.000 |" in lines
    assert "| cohen | 0.5 | 1 | 0 | 0.750 | 0.500 | 0.250 | 0.250 |" in lines
    assert "| cohen | best | 1 | 0 | 0.750 | 0.500 | 0.250 | 0.250 |" in lines
    assert "| densepure | 0.25 | 3 | 2 | 0.750 | 0.750 | 0.500 | 0.000 |" in lines
    # One sigma only for densepure: no best row for it.
    assert not any(l.startswith("| densepure | best") for l in lines)
    # Best row right after the sigmas of its group.
    assert lines.index("| cohen | best | 1 | 0 | 0.750 | 0.500 | 0.250 | 0.250 |") == 4


def test_format_table_latex() -> None:
    text = _with_best("latex", digits=2)
    assert text.startswith("\\begin{tabular}{lrrrrrrr}\n\\toprule\n")
    assert "method & $\\sigma$ & $K$ & steps & $r=0$ & $r=0.25$ & $r=0.5$ & $r=0.75$ \\\\" in text
    assert "cohen & best & 1 & 0 & 0.75 & 0.50 & 0.25 & 0.25 \\\\" in text
    assert text.rstrip().endswith("\\bottomrule\n\\end{tabular}")


def test_format_table_csv_round_trips() -> None:
    text = _with_best("csv")
    back = pd.read_csv(io.StringIO(text))
    assert list(back.columns) == ["method", "sigma", "K", "steps", "0", "0.25", "0.5", "0.75"]
    best = back[(back["method"] == "cohen") & (back["sigma"] == "best")]
    assert best[["0", "0.25", "0.5", "0.75"]].to_numpy().tolist() == [[0.75, 0.5, 0.25, 0.25]]
    assert len(back) == 5


def test_format_table_rejects_unknown_format() -> None:
    with pytest.raises(UserError):
        format_table(certified_accuracy(known_table(), RADII), "html")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- plot


def test_plot_png(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "curves.png"
    assert plot_certified_accuracy(known_table(), str(path)) == str(path)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (800, 500)


# --------------------------------------------------------------------------- loading runs


def test_load_complete_run(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", known_table())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = load_run(run)
    assert df.attrs["partial"] is False
    assert (df["run"] == run).all() and len(df) == 16
    both = load_runs([run, write_run(tmp_path / "run2", known_table())])
    assert len(both) == 32 and both.attrs == {"partial": False, "partial_runs": [], "decided_radii": {}}


def test_load_run_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="manifest.json"):
        load_run(str(tmp_path / "nowhere"))


def test_load_partial_run_from_unit_log(tmp_path: Path) -> None:
    run = partial_run(tmp_path)
    with pytest.warns(PartialRunWarning, match=r"4/6 units done"):
        df = load_run(run)
    assert df.attrs["partial"] is True
    assert len(df) == 1
    row = df.iloc[0]
    p = 0.001 ** (1 / 100)
    assert row["image_id"] == 0 and row["prediction"] == 1 and bool(row["correct"])
    assert row["p_lower"] == pytest.approx(p) and row["radius"] == pytest.approx(0.25 * norm.ppf(p))
    with pytest.warns(PartialRunWarning):
        both = load_runs([run])
    assert both.attrs["partial_runs"] == [run]


def test_run_status_partial(tmp_path: Path) -> None:
    run = partial_run(tmp_path)
    s = run_status(run)
    assert s.status == "running" and s.partial is True
    assert (s.units_done, s.units_total) == (4, 6)
    assert (s.images_done, s.images_total) == (1, 2)
    assert (s.draws_done, s.draws_total) == (120, 2 * (10 + 100))
    assert s.gpu_seconds == pytest.approx(35.0)
    assert s.classifier_calls == 120
    # Wall span: first unit started at 100 - 10 = 90, last finished at 130.
    assert s.wall_seconds == pytest.approx(40.0)
    assert s.draws_per_second == pytest.approx(3.0)
    assert s.draws_per_gpu_second == pytest.approx(120 / 35)
    assert s.eta_seconds == pytest.approx(100 / 3.0)
    assert s.workers == 2
    assert s.accuracy_r0 == [{"method": "cohen", "sigma": 0.25, "votes": 1, "steps": 0, "accuracy": 1.0, "images": 1}]
    text = format_status(s)
    assert "units:      4/6 (66.7%)" in text and "images:     1/2 (50.0%) finished" in text
    assert "3.0 draws/s" in text and "ETA:        0:00:33" in text
    assert "cohen sigma=0.25 K=1 steps=0: 1.000 (1 images)" in text
    assert s.engines == ["cuda bf16 batch 256", "cuda bf16 batch 96"]
    assert "MIXED settings across units: cuda bf16 batch 256; cuda bf16 batch 96" in text
    assert "0.01 GPU-hours (35 s)" in text
    # Units that all ran on CPUs cost CPU time, and say so.
    assert "0.01 CPU-hours (35 s)" in format_status(dataclasses.replace(s, engines=["cpu fp32 batch 16"]))


def test_run_status_complete_without_log(tmp_path: Path) -> None:
    # Config lists cohen only: every image has both cohen sigmas, so all 4 are finished.
    s = run_status(write_run(tmp_path / "run", known_table(), config={"methods": ["cohen"]}))
    assert s.status == "complete" and s.partial is False and s.eta_seconds == 0.0
    assert s.gpu_seconds == 24.0 and s.draws_done == 4400 and s.draws_per_second is None
    assert s.images_done == 4
    assert "throughput: unknown" in format_status(s)


# --------------------------------------------------------------------------- CLI


def test_gather_radii() -> None:
    assert _gather_radii(["a", "--radii", "0", "0.25", "b"]) == ["a", "--radii", "0 0.25", "b"]
    assert _gather_radii(["--radii", "0,0.5", "a", "--format", "csv"]) == ["--radii", "0,0.5", "a", "--format", "csv"]
    assert _gather_radii(["--radii=0", "1", "a"]) == ["--radii", "0 1", "a"]
    assert _gather_radii(["a", "--", "--radii", "1"]) == ["a", "--", "--radii", "1"]
    assert parse_radii("0, 0.25 0.5") == (0.0, 0.25, 0.5)
    with pytest.raises(UserError):
        parse_radii("-1")


def _invoke(cmd, args: list[str]):
    return CliRunner().invoke(cmd, args, catch_exceptions=False)


def test_cli_report_csv_radii_after_runs(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", known_table())
    result = _invoke(report, [run, "--radii", "0", "0.25", "0.5", "0.75", "--format", "csv"])
    assert result.exit_code == 0, result.output
    back = pd.read_csv(io.StringIO(result.stdout))
    assert list(back.columns[-4:]) == ["0", "0.25", "0.5", "0.75"]
    row = back[(back["method"] == "densepure") & (back["K"] == 3)]
    assert row[["0", "0.25", "0.5", "0.75"]].to_numpy().tolist() == [[0.75, 0.75, 0.5, 0.0]]


def test_cli_report_radii_before_runs_and_plot(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", known_table())
    plot = tmp_path / "curves.png"
    result = _invoke(report, ["--radii", "0", "0.5", run, "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "| method | sigma | K | steps | r=0 | r=0.5 |" in result.stdout
    assert plot.exists() and f"plot: {plot}" in result.stderr


def test_cli_report_several_runs_and_partial_note(tmp_path: Path) -> None:
    run_a = write_run(tmp_path / "a", known_table())
    run_b = partial_run(tmp_path)
    result = _invoke(report, [run_a, run_b, "--radii", "0,0.5", "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("| run | method | sigma | K | steps |")
    assert f"| {run_b} | cohen | 0.25 | 1 | 0 | 1.000 | 0.000 |" in result.stdout
    assert "note: run" in result.stderr and "partial" in result.stderr


def test_cli_report_confidence(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", known_table())
    result = _invoke(report, [run, "--radii", "0", "--confidence", "0.95", "--format", "csv"])
    assert result.exit_code == 0, result.output
    back = pd.read_csv(io.StringIO(result.stdout))
    value = back[(back["method"] == "cohen") & (back["sigma"] == "0.5")]["0"].iloc[0]
    assert value == pytest.approx(lower_confidence_bound(3, 4, 0.05))
    assert "lower bounds" in result.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["{missing}"], "manifest.json"),
        (["{run}", "--confidence", "1.5"], "confidence must lie"),
        (["{run}", "--radii", "0", "-0.5"], "radii must be"),
    ],
)
def test_cli_report_user_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    run = write_run(tmp_path / "run", known_table())
    args = [a.format(run=run, missing=str(tmp_path / "missing")) for a in args]
    result = _invoke(report, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_cli_status(tmp_path: Path) -> None:
    run = partial_run(tmp_path)
    result = _invoke(status, [run])
    assert result.exit_code == 0, result.output
    assert "running" in result.stdout and "units:      4/6" in result.stdout
    as_json = json.loads(_invoke(status, [run, "--json"]).stdout)
    assert as_json["units_done"] == 4 and as_json["draws_per_second"] == pytest.approx(3.0)


def test_cli_export(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", known_table())
    out = tmp_path / "sigma050.tsv"
    ambiguous = _invoke(export, [run, "--tsv", str(out), "--method", "densepure"])
    assert ambiguous.exit_code == 2 and "error: 2 groups match" in ambiguous.stderr
    assert not out.exists()
    ok = _invoke(export, [run, "--tsv", str(out), "--sigma", "0.5", "--method", "cohen", "--votes", "1"])
    assert ok.exit_code == 0, ok.output
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and lines[1] == "0\t0\t0\t1.0\t1\t0:00:01.500000"
    assert f"wrote 4 rows to {out}" in ok.stderr


def test_sequential_radii_notes_name_the_undecided_radii_and_the_run() -> None:
    from pipeline.cli.runs import sequential_radii_notes

    assert sequential_radii_notes({}, [0.0, 0.25]) == []  # no sequential run
    assert sequential_radii_notes({"r": (0.25, 0.5)}, [0.25, 0.5]) == []  # exactly its radii
    assert sequential_radii_notes({"r": (0.25, 0.5)}, [0.5]) == []  # a subset is comparable too
    (note,) = sequential_radii_notes({"runs/a": (0.25, 0.5), "runs/b": (0.5,)}, [0.25, 0.5], plot=False, name_runs=True)
    assert note.startswith("runs/b: sequential sampling decided r = 0.5 only") and "r = 0.25 in the table" in note
    (note,) = sequential_radii_notes({"r": (0.25, 0.5)}, [0.25, 0.5], plot=True)
    assert "the plot away from r = 0.25, 0.5" in note and "in the table" not in note and not note.startswith("r:")
