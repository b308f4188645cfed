"""The Python snippets of README.md and docs/*.md run as written (new-user trial: every one was run
by hand; these keep them running). Paths a snippet names are made to exist in a temporary folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config, write_fashion_like

ROOT = Path(__file__).resolve().parents[1]


def snippets(doc: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)


@pytest.fixture
def tiny_run(tmp_path: Path, monkeypatch, one_thread) -> Path:
    """runs/fashion_mnist_demo in the cwd: a tiny finished pruning (levels 1..4) as the docs name it."""
    from ptd.config import load_config
    from ptd.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(write_fashion_like(tmp_path / "fm", 200, 60), threads=1,
                      prune={"target_sparsity": 0.59, "retrain": {"epochs": 1, "batch_size": 64, "lr": 0.02}})
    cfg["teacher"]["optim"]["epochs"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run_pipeline(load_config(str(tmp_path / "c.yaml")), "runs/fashion_mnist_demo", until="prune")
    return tmp_path


def test_the_students_page_snippet_runs_on_a_finished_run(tiny_run: Path, capsys):
    (code,) = snippets("docs/students.md")
    ns: dict = {}
    exec(compile(code, "docs/students.md", "exec"), ns)
    assert "features.0" in capsys.readouterr().out  # plan.table() printed the layers
    # the masks come back in the model's layer order, as ptd prune prints them
    assert list(ns["masks"]) == [n for n, _ in ns["pruned_teacher"].named_parameters() if n in ns["masks"]]
    from ptd.models import build_from_spec

    rebuilt = build_from_spec(ns["plan"].spec)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in ns["student"].parameters())


def test_the_readme_register_your_own_model_snippet_runs(tmp_path: Path, monkeypatch, one_thread):
    import torch.nn as nn

    from ptd.config import load_config
    from ptd.models import MODELS
    from ptd.pipeline import run_pipeline

    class MyNet(nn.Module):  # MyNet(num_classes, in_channels=3, width=1.0) -> nn.Module, as the snippet says
        def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0):
            super().__init__()
            c = max(1, int(16 * width))
            self.body = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(2 * c, num_classes)

        def forward(self, x):
            return self.fc(self.body(x))

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(write_fashion_like(tmp_path / "fm", 200, 60), threads=1)
    cfg["distill"]["seeds"] = [0]
    cfg["teacher"]["model"] = {"arch": "vgg11"}  # the snippet sets arch=mynet; vgg's plan would not fit MyNet
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(cfg))
    code = snippets("README.md")[1]
    assert 'MODELS.register("mynet")(MyNet)' in code
    ns = {"MyNet": MyNet, "load_config": load_config, "run_pipeline": run_pipeline}  # the snippet above it imports these
    try:
        exec(compile(code, "README.md", "exec"), ns)
    finally:
        MODELS._items.pop("mynet", None)  # registered twice is an error: leave the registry as found
    assert {s["arm"] for s in ns["results"]["students"]} == {"scratch", "unpruned_teacher", "pruned_teacher"}
