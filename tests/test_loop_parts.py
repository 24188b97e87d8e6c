"""The loop's parts built and used without a Trainer: each is given the collaborators it uses."""

import json

import pytest
import torch

from asg.engine.checkpointing import Checkpointer, Restored
from asg.engine.distributed import Dist
from asg.engine.evaluation.evaluator import Evaluator
from asg.engine.evaluation.final import FinalReport
from asg.engine.guards import LossGuard
from asg.engine.precision import Precision
from asg.engine.rundir.folder import RunDir
from asg.engine.rundir.summary import SUMMARY_VERSION, EvalReport, RunSummary
from asg.engine.timing import PhaseTimer
from asg.errors import AsgError
from asg.models import build_model, make_teacher
from asg.tasks import task_of

CPU = torch.device("cpu")
PROTOCOL = {"tta_flip": False, "eval_max_per_set": None, "bn_mode": "train", "world_size": 1}


def _checkpointer(cfg, model, rd, said=None):
    guard = LossGuard(cfg.train.loss_explosion_factor)
    return Checkpointer(
        rd,
        cfg,
        model,
        Dist(),
        Precision(cfg.train.precision, CPU),
        guard,
        say=(said.append if said is not None else lambda text: None),
    )


def _evaluator(cfg, model, bundle, rd):
    return Evaluator(cfg, model, bundle, task_of(bundle), CPU, Dist(), rd, PROTOCOL, quiet=True)


def test_checkpointer_opens_saves_and_restores_without_a_trainer(tiny_config, tiny_bundle, tmp_path):
    cfg = tiny_config()
    model = build_model(cfg.model, tiny_bundle.num_classes)
    rd = RunDir(tmp_path / "run")
    ck = _checkpointer(cfg, model, rd)
    assert ck.due(2) and not ck.due(3) and ck.due(cfg.train.steps) and ck.kept() == "no checkpoint was written yet"
    with rd:
        ck.open(False, tiny_bundle, ["a.png"], apply=lambda restored: pytest.fail("nothing to restore"))
        ck.save(2, lambda: {"marker": torch.tensor([7.0])}, {}, None, last_loss=lambda: 1.0)
    assert rd.config_path.is_file() and rd.read_lines("skipped_images.txt") == ["a.png"]
    assert ck.committed_step == 2 and "step 2" in ck.kept()

    other = build_model(cfg.model, tiny_bundle.num_classes)
    got: list[Restored] = []
    said: list[str] = []
    with rd:
        _checkpointer(cfg, other, rd, said).open(True, tiny_bundle, [], apply=got.append)
    assert got[0].step == 2 and got[0].evaluated_through is None and got[0].best == {}
    assert float(got[0].state["marker"]) == 7.0 and said[-1].startswith(f"resumed {rd.path} at step 2")
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)

    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with rd, pytest.raises(AsgError, match="non-finite weights at step 4"):
        ck.save(4, dict, {}, None, last_loss=lambda: pytest.fail("the weights are refused first"))
    assert json.loads(rd.manifest_path.read_text())["step"] == 2  # the good checkpoint stays


def test_evaluator_records_rows_and_selections_without_a_trainer(tiny_config, tiny_bundle, tmp_path):
    cfg = tiny_config()
    model = build_model(cfg.model, tiny_bundle.num_classes)
    rd = RunDir(tmp_path / "run")
    ev = _evaluator(cfg, model, tiny_bundle, rd)
    assert ev.due(2) and not ev.due(3) and ev.evaluated_through is None and ev.oracle_set == "real"
    with rd:
        _checkpointer(cfg, model, rd).save(2, dict, ev.best, ev.evaluated_through, last_loss=lambda: None)
        row, results = ev.run(2, 1.25, [1.0, 0.5], checkpointed=True)
    assert row["step"] == 2 and row["scales"] == [1.0, 0.5] and row["tta_flip"] is False
    assert set(row["metrics"]) == set(results) == {"source_val", "real"} and "real_average" not in row  # one real set
    assert rd.read_rows() == [row] and ev.evaluated_through == 2
    assert set(ev.best) == {"source-val", "oracle"} and (rd.path / ev.best["oracle"]["file"]).is_file()
    manifest = rd.read_manifest()  # the checkpoint of step 2 now counts its evaluation and selections
    assert manifest["evaluated_through"] == 2 and set(manifest["best"]) == {"source-val", "oracle"}

    again = _evaluator(cfg, model, tiny_bundle, rd)
    with rd:
        again.restore(manifest["best"], None, step=2)  # a checkpoint saved before its evaluation
    assert again.history == [] and again.pending and rd.read_rows() == []


def test_final_report_writes_a_versioned_summary_without_a_trainer(tiny_config, tiny_bundle, tmp_path):
    cfg = tiny_config()
    model = build_model(cfg.model, tiny_bundle.num_classes)
    rd = RunDir(tmp_path / "run")
    ev = _evaluator(cfg, model, tiny_bundle, rd)
    with rd:
        ev.run(2, 1.0, [1.0, 1.0], checkpointed=False)
        report = FinalReport(
            rd, cfg, model, make_teacher(model), tiny_bundle, task_of(tiny_bundle), CPU, ev, PhaseTimer(), PROTOCOL
        )
        selections = report.write(
            2,
            0,
            controller_history=[],
            group_names=["backbone", "head"],
            teacher_cache={"source": "live"},
            world_size=1,
        )
    summary = rd.read_summary()
    assert rd.is_done() and summary is not None and summary.version == SUMMARY_VERSION
    assert set(summary.selections) == {"last", "source-val", "oracle"} == set(selections)
    last = summary.selections["last"]
    assert last.step == 2 and last.metrics == ev.history[-1]["metrics"] and last.extra["tta_flip"] is False
    assert summary.primary_metric == "mean_class_acc" and summary.class_names == ["a", "b", "c"]
    assert summary.to_dict()["selections"] == json.loads((rd.path / "summary.json").read_text())["selections"]
    assert "| last | 2 |" in (rd.path / "report.md").read_text()


def test_a_summary_of_an_earlier_release_reads(tmp_path):
    """summary.json without ``version`` (asg before it was written) reads as version 0, its gaps filled."""
    old = {
        "name": "r",
        "method": "asg",
        "seed": 1,
        "steps": 8,
        "task": "segmentation",
        "selections": {
            "last": {
                "step": 8,
                "checkpoint": "last.safetensors",
                "tta_flip": True,
                "metrics": {"a": {"miou": 0.5}, "b": {"miou": 0.25}},
                "real_average": {"metric": "miou", "value": 0.375, "over": ["a", "b"]},
            }
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(old))
    summary = RunDir(tmp_path).read_summary()
    assert summary is not None and summary.version == 0 and summary.primary_metric == "miou"
    last = summary.selections["last"]
    assert last.report.value("b", "miou") == 0.25 and last.report.real_average["value"] == 0.375
    assert last.to_dict() == old["selections"]["last"]
    assert RunDir(tmp_path / "none").read_summary() is None


def test_eval_report_averages_the_real_sets_present():
    metrics = {"source_val": {"acc": 0.9}, "x": {"acc": 0.5}, "y": {"acc": 0.7}}
    report = EvalReport.of(metrics, ["x", "y", "z"], "acc")
    assert report.real_average is not None and report.real_average["value"] == pytest.approx(0.6)
    assert report.real_average["over"] == ["x", "y"] and report.to_dict()["metrics"] is metrics
    assert EvalReport.of(metrics, ["x"], "acc").to_dict() == {"metrics": metrics}
    assert RunSummary.from_dict({"selections": {}}).primary_metric == "mean_class_acc"


@pytest.mark.parametrize("full", [True, False])
def test_each_selection_says_whether_it_was_evaluated_on_the_capped_subsets(tiny_config, tiny_bundle, tmp_path, full):
    """With data.eval_max_per_set, the last checkpoint is always evaluated again on the full sets, the source-val and
    oracle ones only with eval.full_eval_selected: each selection's ``eval_max_per_set`` says which (None: full)."""
    cfg = tiny_config("data.eval_max_per_set=2", f"eval.full_eval_selected={str(full).lower()}")
    protocol = {**PROTOCOL, "eval_max_per_set": 2}
    model = build_model(cfg.model, tiny_bundle.num_classes)
    rd = RunDir(tmp_path / "run")
    ev = Evaluator(cfg, model, tiny_bundle, task_of(tiny_bundle), CPU, Dist(), rd, protocol, quiet=True)
    with rd:
        ev.run(2, 1.0, [1.0, 1.0], checkpointed=False)
        report = FinalReport(
            rd, cfg, model, make_teacher(model), tiny_bundle, task_of(tiny_bundle), CPU, ev, PhaseTimer(), protocol
        )
        selections = report.write(
            2, 0, controller_history=[], group_names=["backbone", "head"], teacher_cache={}, world_size=1
        )
    caps = {rule: sel["eval_max_per_set"] for rule, sel in selections.items()}
    assert caps == {"last": None, "source-val": None if full else 2, "oracle": None if full else 2}
