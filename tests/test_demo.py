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
    report = run_demo(out=tmp_path, seeds=2, methods=["erm", "asg"], overrides=over, benchmarks=["digits"],
                      adapt=False)  # fmt: skip
    saved = json.loads((tmp_path / "digits" / "report.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved["runs"]] == [("erm", 0), ("asg", 0), ("erm", 1), ("asg", 1)]
    for run in saved["runs"]:
        assert set(run["metrics"]) == {"synthetic", "mnist5k_test", "uci_digits_test", "real_photos"}
        assert set(run["metrics"]["real_photos"]) == {"top1_agreement", "kl"}
        assert 0.0 <= run["metrics"]["mnist5k_test"]["mean_class_acc"] <= 1.0
    assert saved["table"]["asg"]["seeds"] == 2
    assert [step for step, _ in saved["curves"]["erm"]["mnist5k_test"]] == [2, 4]
    md = (tmp_path / "digits" / "report.md").read_text()
    assert "| erm | 2 |" in md and "oracle" in md.lower()
    assert "| erm | 2 |" in (tmp_path / "report.md").read_text()
    for name in saved["plots"]:
        assert (tmp_path / "digits" / name).stat().st_size > 1000
    # a second call reuses the finished runs instead of training again
    again = run_demo(out=tmp_path, seeds=2, methods=["erm", "asg"], overrides=over, benchmarks=["digits"],
                     adapt=False)  # fmt: skip
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


def test_demo_tunes_on_source_val_only_and_adapts_every_trained_model(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    over = [*TINY, f"data.root={tmp_path}/c", "adapt.rounds=1", "adapt.steps_per_round=2", "train.eval_every=2"]
    run_demo(out=tmp_path, seeds=1, methods=["erm", "asg"], overrides=over, benchmarks=["digits"], tune=True)
    saved = json.loads((tmp_path / "digits" / "report.json").read_text())
    grid = saved["grid"]
    assert [(r["method"], r["value"]) for r in grid] == [
        ("erm", 0.003), ("erm", 0.01), ("erm", 0.03), ("asg", 0.01), ("asg", 0.1), ("asg", 1.0)
    ]  # fmt: skip
    for method, key in (("erm", "optim.lr"), ("asg", "method.kl_weight")):
        rows = [r for r in grid if r["method"] == method]
        scores = [r["source_val"] for r in rows]  # the choice follows source-val, whatever the real sets say
        assert [r["value"] for r in rows if r["chosen"]] == [rows[scores.index(max(scores))]["value"]]
        chosen = next(r["value"] for r in rows if r["chosen"])
        assert saved["choices"][method] == [f"{key}={chosen}"]
        run_cfg = tmp_path / "digits" / "tune" / f"{method}_{key.rsplit('.', 1)[1]}={chosen:g}" / "config.yaml"
        assert run_cfg.exists()  # seed 0 of the chosen setting is the grid run itself (not trained twice)
    adaptations = saved["adaptations"]
    assert [(a["method"], a["seed"]) for a in adaptations] == [("erm", 0), ("asg", 0)]
    for a in adaptations:
        assert set(a["start"]["metrics"]) >= {"mnist5k_test", "uci_digits_test"} and len(a["rounds"]) == 1
    assert set(saved["adaptation"]["erm"]) >= {"before_mnist5k_test", "after_mnist5k_test", "seeds"}
    md = (tmp_path / "digits" / "report.md").read_text()
    assert "Tuning grid" in md and "**chosen**" in md and "mnist5k_test before" in md
