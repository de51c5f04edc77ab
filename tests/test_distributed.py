"""Two processes under torchrun (gloo, CPU): both ranks end with identical weights, the loss goes down, metrics are
reduced over ranks and only rank 0 writes. Slow (DEFORMATTN_SLOW=1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("sklearn")


@pytest.mark.slow  # two torchrun processes training for three epochs
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "deformattn", "train", "--output-dir", str(out), "--epochs", "3", "--max-train-samples", "96",
           "--max-eval-samples", "45", "--batch-size", "16", "--img-size", "16", "--lr", "3e-3",
           "--warmup-epochs", "0.5", "--device", "cpu", "--progress", "plain"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 3
    checksums = summary["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1] and summary["replicas_identical"]
    history = json.loads((out / "metrics.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # metrics cover the whole evaluation set once (45 images split 23 / 22 over the ranks, summed)
    assert summary["num_eval"] == 45
    assert all(abs(row["eval_acc"] * 45 - round(row["eval_acc"] * 45)) < 1e-6 for row in history)
    # 96 images / 2 ranks / 16 per step = 3 steps per epoch per rank
    assert torch.load(out / "last.pt", weights_only=True)["scheduler"]["last_epoch"] == 9
    assert len(torch.load(out / "last.pt", weights_only=True)["rng"]) == 2
    # only rank 0 printed the run's lines and wrote files
    assert r.stdout.count("deformattn train: training") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.pt", "config.json", "curves.png", "last.pt", "metrics.csv", "metrics.json", "summary.json"])
