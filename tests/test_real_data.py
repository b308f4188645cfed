"""Integration on the real Fashion-MNIST files (Debian's dataset-fashion-mnist)."""
import json
from pathlib import Path

import pytest

from ptd.config import load_config
from ptd.pipeline import run_pipeline

FM = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not (FM / "train-images-idx3-ubyte.gz").is_file() and not (FM / "train-images-idx3-ubyte").is_file(),
                    reason="Fashion-MNIST is not installed (scripts/setup.sh installs dataset-fashion-mnist)")
def test_pipeline_on_real_fashion_mnist(tmp_path):
    cfg = load_config(None, [
        "name=real", "quiet=true",
        "data.train_subset=8000", "data.test_subset=5000", "data.crop_padding=2",
        "teacher.model.arch=vgg", "teacher.model.kwargs={plan: [16, M, 32, M, 64, M, 64, M]}",
        "teacher.optim={epochs: 3, batch_size: 128, lr: 0.05, milestones: [2], gamma: 0.2}",
        "prune.target_sparsity=0.36", "prune.retrain={epochs: 1, batch_size: 128, lr: 0.01}",
        "distill.seeds=[0]", "distill.arms=[pruned_teacher]",
        "distill.optim={epochs: 2, batch_size: 128, lr: 0.05, milestones: [1], gamma: 0.2}",
    ])
    r = run_pipeline(cfg, tmp_path / "run")
    # Chance is 0.10; a few epochs of a small CNN on 12k images give well over 0.8.
    assert r["teacher"]["test_acc"] > 0.80
    assert r["pruned_teacher"]["sparsity"] == pytest.approx(0.36, abs=1e-3)
    assert r["pruned_teacher"]["test_acc"] > 0.80
    assert r["students"][0]["test_acc"] > 0.75
    assert r["student"]["params"] < 0.75 * r["teacher"]["params"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["dataset"] == "fashion_mnist"
    # Every model learned: the chance check (test_stats.py) flags none of them on real data.
    from ptd.report import not_learned

    assert saved["test_set"] == {"n": 5000, "num_classes": 10, "chance": pytest.approx(saved["test_set"]["chance"])}
    assert 0.09 < saved["test_set"]["chance"] < 0.12 and not_learned(saved) == []
    assert "did not learn" not in (tmp_path / "run" / "report.md").read_text()
