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
    report = run_demo(out=tmp_path, seeds=2, methods=["erm", "asg"], overrides=TINY + [f"data.root={tmp_path}/c"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved["runs"]] == [("erm", 0), ("asg", 0), ("erm", 1), ("asg", 1)]
    for run in saved["runs"]:
        assert set(run["metrics"]) == {"synthetic", "mnist5k", "uci_digits", "real_photos"}
        assert set(run["metrics"]["real_photos"]) == {"top1_agreement", "kl"}
        assert 0.0 <= run["metrics"]["mnist5k"]["mean_class_acc"] <= 1.0
    assert saved["table"]["asg"]["seeds"] == 2
    assert [step for step, _ in saved["curves"]["erm"]["mnist5k"]] == [2, 4]
    md = (tmp_path / "report.md").read_text()
    assert "| erm | 2 |" in md and "oracle" in md.lower()
    for name in saved["plots"]:
        assert (tmp_path / name).stat().st_size > 1000
    # a second call reuses the finished runs instead of training again
    again = run_demo(out=tmp_path, seeds=2, methods=["erm", "asg"], overrides=TINY + [f"data.root={tmp_path}/c"])
    assert again["table"] == report["table"]
