"""benchmarks/compare_to_baseline.py: the pick among several ensembles is made on validation only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def _write(folder: Path, ids, lesions, y, test_prob, *, val_auc: float | None = None, baseline: bool = False) -> Path:
    folder.mkdir(parents=True)
    df = pd.DataFrame({"image_id": ids, "lesion_id": lesions, "label": y, "split": "test"})
    if baseline:
        df["prob"] = test_prob
    else:
        df["calibrated_prob"] = test_prob
        (folder / "report.json").write_text(json.dumps({
            "val": {"ensemble": {"auc": val_auc}}, "members": [{"trial_id": "t1"}],
            "best_member": {"trial_id": "t1"}}))
        df["prob_t1"] = test_prob
    df.to_parquet(folder / "predictions.parquet")
    return folder


def test_the_pick_follows_validation_not_test(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random(n) < 0.2).astype(int)
    ids, lesions = [f"I{i}" for i in range(n)], [f"L{i // 2}" for i in range(n)]
    strong, weak = 1 / (1 + np.exp(-(3 * y + rng.normal(0, 1, n)))), 1 / (1 + np.exp(-(0.5 * y + rng.normal(0, 1, n))))
    base = _write(tmp_path / "base", ids, lesions, y, weak, baseline=True)
    # "weakval" is the better model on test, but the lower one on validation: it must not be picked
    a = _write(tmp_path / "weakval", ids, lesions, y, strong, val_auc=0.80)
    b = _write(tmp_path / "strongval", ids, lesions, y, weak, val_auc=0.85)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_to_baseline.py"), "--ensemble", str(a),
                          "--ensemble", str(b), "--baseline", str(base), "--n-boot", "200"],
                         capture_output=True, text=True, check=True).stdout
    assert "weakval 0.8000, strongval 0.8500 ← pick" in out
    assert f"ensemble: {b} " in out
    assert "paired DeLong, weakval − baseline" in out and "other: weakval" in out
    # one ensemble: no pick line, the targets are checked on it
    one = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_to_baseline.py"), "--ensemble", str(a),
                          "--baseline", str(base), "--n-boot", "200"], capture_output=True, text=True, check=True).stdout
    assert "chosen on validation" not in one and f"ensemble: {a} " in one and "targets:" in one
