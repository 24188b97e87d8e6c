import json

from asg.demo import run_demo

TINY = [
    "data.num_train=200",
    "data.image_size=32",
    "data.eval_max_per_set=30",
    "train.steps=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.progress=false",
]


def test_demo_report_has_runs_table_curves_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    over = TINY + [f"data.root={tmp_path}/c"]
    report = run_demo(out=tmp_path, seeds=2, methods=["erm", "asg"], overrides=over, benchmarks=["digits"])
    saved = json.loads((tmp_path / "digits" / "report.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved["runs"]] == [("erm", 0), ("asg", 0), ("erm", 1), ("asg", 1)]
    for run in saved["runs"]:
        assert set(run["metrics"]) == {"synthetic", "mnist5k", "uci_digits", "real_photos"}
        assert set(run["metrics"]["real_photos"]) == {"top1_agreement", "kl"}
        assert 0.0 <= run["metrics"]["mnist5k"]["mean_class_acc"] <= 1.0
    assert saved["table"]["asg"]["seeds"] == 2
    assert [step for step, _ in saved["curves"]["erm"]["mnist5k"]] == [2, 4]
    md = (tmp_path / "digits" / "report.md").read_text()
    assert "| erm | 2 |" in md and "oracle" in md.lower()
    assert "| erm | 2 |" in (tmp_path / "report.md").read_text()
    for name in saved["plots"]:
        assert (tmp_path / "digits" / name).stat().st_size > 1000
    # a second call reuses the finished runs instead of training again
    again = run_demo(out=tmp_path, seeds=2, methods=["erm", "asg"], overrides=over, benchmarks=["digits"])
    assert again["benchmarks"]["digits"]["table"] == report["benchmarks"]["digits"]["table"]


def test_segmentation_demo_reports_miou_per_method(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    over = [*TINY, "data.num_train=40", "data.batch_size=8", f"data.root={tmp_path}/c"]
    run_demo(out=tmp_path, seeds=1, methods=["erm", "asg"], overrides=over, benchmarks=["scenes"])
    saved = json.loads((tmp_path / "scenes" / "report.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["erm", "asg"]
    for run in saved["runs"]:
        assert set(run["metrics"]) == {"synthetic", "mnist_photos", "real_photos"}
        assert set(run["metrics"]["mnist_photos"]) == {"pixel_acc", "miou"}
    assert "mIoU" in (tmp_path / "scenes" / "report.md").read_text()
    run_md = (tmp_path / "scenes" / "runs" / "asg_seed0" / "report.md").read_text()
    assert "Per-class IoU" in run_md and "predictions.png" in run_md
    assert (tmp_path / "scenes" / "runs" / "asg_seed0" / "predictions.png").stat().st_size > 1000
