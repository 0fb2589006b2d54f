"""`make demo`'s pipeline end to end on a smaller setting: synth → split → inspect → train → sweep (Ray)
→ query → two ensembles → predict → report → summary; everything lands under --root, the scratch
folder is removed, nothing is added to the repository."""

from __future__ import annotations

import glob
import os
import re
import tempfile
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_demo_pipeline_small(tmp_path, monkeypatch, capsys):
    from skinsweep.sweep.runner import _loopback_only

    if not _loopback_only() and not os.environ.get("SKINSWEEP_ALLOW_NETWORK_RAY"):
        pytest.skip("run via `make test` (loopback-only network namespace) or set SKINSWEEP_ALLOW_NETWORK_RAY=1")
    from skinsweep import demo

    monkeypatch.chdir(ROOT)  # the demo reads sweeps/demo.yaml and ensembles/*.yaml
    monkeypatch.delenv("SKINSWEEP_CACHE", raising=False)  # the demo puts its cache under --root
    scratch_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "skinsweep-demo-*")))
    repo_results_before = sorted(p.name for p in (ROOT / "results").glob("*")) if (ROOT / "results").is_dir() else []
    root = tmp_path / "r"
    demo.main(["--root", str(root), "--n", "400", "--size", "96x72", "--epochs", "4", "--num-samples", "4",
               "--n-boot", "100"])
    out = capsys.readouterr().out

    trials = pd.read_parquet(root / "demo-sweep" / "trials.parquet")
    assert len(trials) == 4 and (trials["status"] == "completed").any()
    for name in ("best", "dino_clip"):
        assert (root / "demo-ensembles" / name / "report.json").is_file()
        assert (root / "demo-ensembles" / name / "bundle" / "manifest.json").is_file()
    scores = pd.read_csv(root / "demo-ensembles" / "new-predictions.csv")
    assert len(scores) == 8 and scores["calibrated_prob"].between(0, 1).all()
    page = root / "demo-sweep" / "report" / "index.html"
    html = page.read_text()
    for sid in ("overview", "models", "ensembles", "gallery", "errors"):
        assert re.search(rf"id=[\"']{sid}[\"']", html), sid
    assert (root / ".cache").is_dir()  # the image cache stayed under --root
    # the closing summary
    assert "demo finished" in out and "ensembles vs their best single member" in out and str(page.resolve()) in out
    # nothing left behind: the scratch folder (Ray session, trial scratch) is gone, the repo is untouched
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "skinsweep-demo-*"))) == scratch_before
    after = sorted(p.name for p in (ROOT / "results").glob("*")) if (ROOT / "results").is_dir() else []
    assert after == repo_results_before
