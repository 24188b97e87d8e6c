"""`asg compare`: one table of two tiny finished runs (ERM and ASG on the own-data recipes), read from their
summary.json and config.yaml; a folder that is not a finished run is one error line."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from asg.cli import main
from asg.compare import compare_runs, table

pytestmark = pytest.mark.slow  # every test reads the two runs trained end to end by the `runs` fixture

TINY = [
    "data.num_workers=0",
    "data.image_size=32",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.source_val_fraction=0.25",
    "train.steps=2",
    "train.eval_every=1",
    "train.checkpoint_every=2",
    "train.progress=false",
    "eval.retention=false",
    "optim.warmup_steps=0",
]


def _image_folder(root: Path) -> None:
    """Two classes (a red or a blue square) of 6 training images and 2 images in each of two real sets."""
    for split, n in (("train", 6), ("photos", 2), ("sketches", 2)):
        for label, color in (("blue", (10, 10, 200)), ("red", (200, 10, 10))):
            for i in range(n):
                path = root / split / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), tuple(c + 5 * i for c in color)).save(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    _image_folder(tmp / "images")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for recipe, extra in (
            ("imagefolder_erm", ["optim.lr=0.02", "train.seed=3"]),
            ("imagefolder_asg", ["optim.backbone_lr_mult=0.25", "train.seed=4"]),
        ):
            sets = [f"--set={o}" for o in [f"data.root={tmp / 'images'}", *TINY, *extra]]
            assert main(["train", "--config", recipe, *sets, "--out", str(tmp / "runs" / recipe)]) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp / "runs" / "imagefolder_erm", tmp / "runs" / "imagefolder_asg"


def test_rows_hold_each_runs_settings_and_selections(runs):
    erm, asg = runs
    rows = compare_runs([erm, asg])
    assert [r.run for r in rows] == ["imagefolder_erm", "imagefolder_asg"]  # relative to the common folder
    assert [(r.method, r.backbone_lr_mult, r.lr, r.steps, r.seed) for r in rows] == [
        ("erm", 0.1, 0.02, 2, 3),
        ("asg", 0.25, 0.01, 2, 4),
    ]
    for row, path in zip(rows, runs):
        summary = json.loads((path / "summary.json").read_text())
        assert row.metric == summary["primary_metric"] == "mean_class_acc"
        assert sorted(row.scores) == ["photos", "sketches"]  # the real sets; source-val is not a column
        for key in ("last", "source-val", "oracle"):
            for name in ("photos", "sketches"):
                assert row.scores[name][key] == summary["selections"][key]["metrics"][name]["mean_class_acc"]


def test_cli_prints_one_table(runs, capsys):
    erm, asg = runs
    assert main(["compare", str(erm), str(asg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "run",
        "method",
        "bb_lr_mult",
        "lr",
        "steps",
        "seed",
        "metric",
        "photos",
        "last",
        "photos",
        "sv",
        "photos",
        "oracle",
        "sketches",
        "last",
        "sketches",
        "sv",
        "sketches",
        "oracle",
    ]
    summary = json.loads((asg / "summary.json").read_text())
    sv = summary["selections"]["source-val"]["metrics"]["sketches"]["mean_class_acc"]
    assert lines[3].split()[:7] == ["imagefolder_asg", "asg", "0.25", "0.01", "2", "4", "mean_class_acc"]
    assert lines[3].split()[-2] == f"{100 * sv:.1f}"
    assert lines[-1].startswith("metric in %")
    assert main(["compare", str(erm), "--markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| run | method |") and md[1].startswith("|---|") and md[2].startswith("| imagefolder_erm")


def test_a_folder_that_is_not_a_finished_run_is_one_line(runs, tmp_path, capsys):
    erm, _ = runs
    unfinished = tmp_path / "unfinished"
    shutil.copytree(erm, unfinished)
    (unfinished / "done").unlink()
    (tmp_path / "empty").mkdir()
    for path, says in (
        (unfinished, "is not a finished run"),
        (tmp_path / "empty", "has no config.yaml"),
        (tmp_path / "missing", "is not a run folder"),
    ):
        assert main(["compare", str(erm), str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing half-printed
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and str(path) in err[0], err


def test_table_of_rows_without_a_selection_shows_a_dash(runs):
    rows = compare_runs([runs[0]])
    rows[0].scores["photos"]["oracle"] = None
    assert "-" in table(rows).splitlines()[2].split()
