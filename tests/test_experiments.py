"""Every registered experiment builds and trains 2 steps on CPU; the CLI lists experiments,
applies typed overrides and rejects bad ones."""

import dataclasses
import json

import numpy as np
import pytest

import experiments
from experiments.__main__ import main as cli
from jaxattn.train import train


@pytest.mark.parametrize("name", sorted(experiments.REGISTRY))
def test_registered_experiment_builds_and_runs_two_steps(name):
    module = experiments.get(name)
    cfg = module.smoke_config()
    assert cfg.run.steps == 2
    for fn in ("default_config", "quick_config", "build_task", "main"):
        assert callable(getattr(module, fn))
    res = train(cfg, module.build_task(cfg))
    assert res.step == 2 and np.isfinite(res.train_metrics["loss"])


def test_zoology_every_model_trains_two_steps(tmp_path):
    from experiments.zoology import experiment as zoo

    cfg = zoo.smoke_config()
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep,
                                                             output_dir=str(tmp_path)))
    rows = zoo.run_sweep(cfg, verbose=False)
    assert {r["model"] for r in rows} == set(cfg.sweep.models)
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 2 for r in rows)
    saved = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(saved) == len(rows)
    assert "| L (K) | model |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy_vs_width.png").stat().st_size > 1000


def test_cli_list_print_config_and_errors(capsys):
    assert cli(["--list"]) == 0
    assert "zoology" in capsys.readouterr().out
    assert cli(["zoology", "--quick", "--override", "run.steps=7", "sweep.widths=8,16",
                "-o", "optim.grad_clip_norm=none", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["run"]["steps"] == 7 and cfg["sweep"]["widths"] == [8, 16]
    assert cfg["optim"]["grad_clip_norm"] is None
    assert cli(["zoology", "--override", "run.stepz=1"]) == 2
    assert "unknown field" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.get("nope")
