"""tests/bench.py runs end to end on the CPU at tiny sizes and writes the rows it promises."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["uml", "joint_unet", "ensemble_annotators", "uncertainty_multiloss"]


def test_bench_quick_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "tests/bench.py", "--quick", "--device", "cpu", "--steps", "2",
                           "--warmup", "1", "--workers", "1", "--write-processes", "1", "--tmp", str(tmp_path),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["script"], r["pipeline"], r["workers"]) for r in rows] == [
        (s, p, w) for s in SCRIPTS for p, w in (("project", None), ("dataloader", 1))]
    for r in rows:
        assert r["steps"] == 2 and r["loss_finite"], r
        for key in ("images_per_s", "steps_per_s", "seconds", "peak_memory_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert 0 <= r["data_wait_share"] < 1, r
        # images/s is the images a step reads: the ensemble's meta step reads U and C_i batches
        per_step = sum(int(b) for b in r["batch"].split("+"))
        assert math.isclose(r["images_per_s"], r["steps_per_s"] * per_step, rel_tol=1e-9), r
    for s in SCRIPTS:
        project, loader = [r for r in rows if r["script"] == s]
        assert math.isclose(project["vs_best_loader"], project["images_per_s"] / loader["images_per_s"])
        assert math.isclose(result["summary"][s]["ratio"], project["vs_best_loader"])
        assert f"| {s} |" in done.stdout
    assert rows[4]["batch"] == "2 + 8"  # the ensemble: 2 annotations of U + the clean batch (--quick: 8)
    assert not list(tmp_path.glob("bench-*")), "the temporary image folder was left behind"
