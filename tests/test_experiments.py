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


# Every Zoology model trains 2 steps through run_sweep; the models are split over two tests so
# that each stays within the per-test budget (one compile per model family).
ZOOLOGY_MODEL_GROUPS = [("attention", "baseconv", "based"), ("sparse", "based_only")]


def test_zoology_model_groups_cover_every_model():
    from experiments.zoology.model import MODELS

    assert sorted(m for g in ZOOLOGY_MODEL_GROUPS for m in g) == sorted(MODELS)


@pytest.mark.parametrize("models", ZOOLOGY_MODEL_GROUPS, ids="+".join)
def test_zoology_every_model_trains_two_steps(tmp_path, models):
    from experiments.zoology import experiment as zoo

    cfg = zoo.smoke_config()
    # with the first group, one extra point at another K and width: its own table row, "-" in
    # the grid's columns
    extra = (("baseconv", 32, 1, 8),) if "attention" in models else ()
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(
        cfg.sweep, output_dir=str(tmp_path), models=models, extra_points=extra))
    rows = zoo.run_sweep(cfg, verbose=False)
    assert {r["model"] for r in rows} == set(models)
    assert len(rows) == len(models) + len(extra)
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 2 for r in rows)
    saved = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(saved) == len(rows)
    assert (tmp_path / "accuracy_vs_width.png").stat().st_size > 1000
    if extra:
        assert (rows[-1]["kv_pairs"], rows[-1]["width"]) == (1, 8)
        md = (tmp_path / "results.md").read_text()
        assert "| L (K) | model | D=8 | D=16 |" in md
        assert "| 32 (2) | baseconv | - |" in md and "| 32 (1) | baseconv |" in md


def test_zoology_sweep_points_and_table_with_missing_cells():
    from experiments.zoology import experiment as zoo

    cfg = zoo.quick_config()
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(
        cfg.sweep, models=("attention",), widths=(32,), lengths=(32, 64), kv_pairs=(4, 4),
        batch_sizes=(64, 128), extra_points=(("baseconv", 64, 2, 128), ("based", 16, 1, 8))))
    pts = zoo.sweep_points(cfg)
    assert [(p["model"], p["length"], p["kv"], p["width"], p["batch"]) for p in pts] == [
        ("attention", 32, 4, 32, 64), ("attention", 64, 4, 32, 128),
        ("baseconv", 64, 2, 128, 128),  # batch of its length
        ("based", 16, 1, 8, cfg.run.batch_size)]  # length not in the grid: run.batch_size
    bad = dataclasses.replace(cfg, sweep=dataclasses.replace(
        cfg.sweep, extra_points=(("nope", 32, 2, 64),)))
    with pytest.raises(ValueError, match="unknown model"):
        zoo.sweep_points(bad)
    rows = [dict(length=n, kv_pairs=k, model=m, width=w, accuracy=a)
            for n, k, m, w, a in [(64, 4, "attention", 32, 0.9), (32, 4, "attention", 32, 0.8),
                                  (64, 2, "baseconv", 128, 0.6), (64, 2, "baseconv", 64, 0.5)]]
    lines = zoo.results_table(rows).splitlines()
    assert lines[0] == "| L (K) | model | D=32 | D=64 | D=128 |"
    assert lines[2:] == ["| 32 (4) | attention | 0.800 | - | - |",
                         "| 64 (4) | attention | 0.900 | - | - |",
                         "| 64 (2) | baseconv | - | 0.500 | 0.600 |"]


def test_cli_list_print_config_and_errors(capsys):
    assert cli(["--list"]) == 0
    assert "zoology" in capsys.readouterr().out
    assert cli(["zoology", "--quick", "--override", "run.steps=7", "sweep.widths=8,16",
                "-o", "optim.grad_clip_norm=none", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["run"]["steps"] == 7 and cfg["sweep"]["widths"] == [8, 16]
    assert cli(["zoology", "--quick", "--print-config", "-o",
                "sweep.extra_points=(baseconv,32,2,64),(based,64,4,128)"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["sweep"]["extra_points"] == [["baseconv", 32, 2, 64], ["based", 64, 4, 128]]
    assert cfg["optim"]["grad_clip_norm"] is None
    assert cli(["zoology", "--override", "run.stepz=1"]) == 2
    assert "unknown field" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.get("nope")


def test_cli_results_go_to_a_run_directory_unless_published(capsys, tmp_path):
    from experiments.zoology.experiment import HERE

    assert cli(["zoology", "--quick", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)["sweep"]["output_dir"]
    assert out.startswith("runs/zoology/") and len(out) > len("runs/zoology/")
    assert cli(["zoology", "--quick", "--print-config", "--results-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["sweep"]["output_dir"] == str(tmp_path)
    assert cli(["zoology", "--quick", "--print-config", "--publish"]) == 0
    assert json.loads(capsys.readouterr().out)["sweep"]["output_dir"] == str(HERE / "results")
    assert cli(["zoology", "--medium", "--print-config", "--publish"]) == 0
    medium = json.loads(capsys.readouterr().out)
    assert medium["sweep"]["output_dir"] == str(HERE / "results" / "medium")
    assert medium["run"]["steps"] == 6000 and medium["data"]["vocab_size"] == 256
    assert cli(["routing", "--medium", "--print-config"]) == 2  # no medium preset there
    assert "no --medium preset" in capsys.readouterr().err
