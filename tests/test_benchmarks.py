"""`benchmarks/run.py --smoke` and `benchmarks/batches.py --smoke` end to end: they finish and give a number in every
row (no timing checks)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # run by CI; `pytest -m 'not slow'` skips it locally

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^\d+(\.\d+)?$")


def _rows():
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ROWS


def test_smoke_benchmark_writes_a_full_table(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in out.read_text().splitlines() if line.startswith("| ") and not line.startswith("| what")]
    cells = {line.split(" | ")[0][2:]: [c.strip() for c in line.strip("|").split("|")] for line in lines}
    for _, what in _rows():
        assert what in cells, f"missing row {what!r}"
        row = cells[what]
        assert NUMBER.match(row[1]), f"{what}: median wall {row[1]!r}"
        assert re.match(r"^\d+\.\d+x$", row[2]), f"{what}: ratio {row[2]!r}"
        if not what.startswith(("fit:", "preprocess:", "load ", "predict:")) or what.endswith("peak RSS"):
            assert NUMBER.match(row[3]), f"{what}: peak RSS {row[3]!r}"


@pytest.mark.parametrize("mode", ["check", "noop"])
def test_smoke_batches_benchmark_gives_every_row(tmp_path, mode):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "batches.py"), "--smoke", *(["--noop"] if mode == "noop" else [])],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    if mode == "check":
        rows = {"cold", "batch"}
    else:  # the no-op rerun without a batches root and with each count of batches taken (smoke: 0, 2 and 3)
        rows = {"no batches root", "0 batches", "2 batches", "3 batches"}
        assert out["ratios to no batches root"].keys() == rows
        assert all(isinstance(r, float) and r > 0 for r in out["ratios to no batches root"].values())
        # Every batch landed and was checked: accepted or quarantined.
        assert {name: sum(verdicts.values()) for name, verdicts in out["batches"].items()} == {
            "0 batches": 0, "2 batches": 2, "3 batches": 3}
    assert out["medians"].keys() == rows
    assert all(isinstance(v, float) and v > 0 for v in out["medians"].values()), out["medians"]
