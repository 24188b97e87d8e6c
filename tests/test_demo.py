import json

import pytest

from asg.demo import DIGITS, run_demo


def demo_chosen():
    """The digits benchmark's fixed choices (label, overrides) that ``asg demo`` uses without tuning."""
    return DIGITS.chosen


pytestmark = pytest.mark.slow  # end-to-end runs and spawned processes: `make test` runs them, `-m "not slow"` skips


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """One cache folder for the module's demos (not the user's ~/.cache): the rendered digits (data.root) and,
    under XDG_CACHE_HOME, the parsed real digits, made by the first demo and read by the others."""
    return tmp_path_factory.mktemp("demo_caches")


TINY = [
    "data.num_train=200",
    "data.image_size=32",
    "data.eval_max_per_set=30",
    "train.steps=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.progress=false",
]


def test_demo_report_has_runs_table_curves_and_plots(tmp_path, monkeypatch, caches):
    """As `asg demo` runs: the runs in its pool of worker processes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(caches / "xdg"))
    over = TINY + [f"data.root={caches}/c"]
    report = run_demo(out=tmp_path, seeds=2, methods=["erm", "asg"], overrides=over, benchmarks=["digits"], adapt=False)
    saved = json.loads((tmp_path / "digits" / "report.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved["runs"]] == [("erm", 0), ("asg", 0), ("erm", 1), ("asg", 1)]
    for run in saved["runs"]:
        assert set(run["metrics"]) == {"synthetic", "mnist5k_test", "uci_digits_test", "real_photos"}
        assert set(run["metrics"]["real_photos"]) == {"top1_agreement", "kl"}
        assert 0.0 <= run["metrics"]["mnist5k_test"]["mean_class_acc"] <= 1.0
    assert saved["table"]["asg"]["seeds"] == 2
    assert [step for step, _ in saved["curves"]["erm"]["mnist5k_test"]] == [2, 4]
    md = (tmp_path / "digits" / "report.md").read_text()
    chosen = {label: dict(o.split("=", 1) for o in over) for label, over in demo_chosen()}
    erm, asg = chosen["erm"], chosen["asg"]  # every table names the rates and knob of each row
    erm_row = f"| erm | {float(erm['optim.lr']):.3g} | {float(erm['optim.backbone_lr_mult']):.3g}× lr | – | fixed | 2 |"
    asg_row = (
        f"| asg | {float(asg['optim.lr']):.3g} | {float(asg['optim.backbone_lr_mult']):.3g}× lr | "
        f"kl_weight {float(asg['method.kl_weight']):.3g} | fixed | 2 |"
    )
    assert erm_row in md and asg_row in md and "oracle" in md.lower()
    assert erm_row in (tmp_path / "report.md").read_text()
    for name in saved["plots"]:
        assert (tmp_path / "digits" / name).stat().st_size > 1000
    # a second call reuses the finished runs instead of training again
    again = run_demo(out=tmp_path, seeds=2, methods=["erm", "asg"], overrides=over, benchmarks=["digits"], adapt=False)
    assert again["benchmarks"]["digits"]["table"] == report["benchmarks"]["digits"]["table"]
    kept = [p for p in (tmp_path / "digits").glob("report.*.md")]  # the first report is kept, not overwritten
    assert len(kept) == 1 and kept[0].read_text() == md and len(list(tmp_path.glob("report.*.md"))) == 1


def test_segmentation_demo_reports_miou_per_method(tmp_path, monkeypatch, caches):
    monkeypatch.setenv("XDG_CACHE_HOME", str(caches / "xdg"))
    over = [*TINY, "data.num_train=40", "data.batch_size=8", f"data.root={caches}/c"]
    run_demo(out=tmp_path, seeds=1, methods=["erm", "asg"], overrides=over, benchmarks=["scenes"], jobs=1)
    saved = json.loads((tmp_path / "scenes" / "report.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["erm", "asg"]
    for run in saved["runs"]:
        assert set(run["metrics"]) == {"synthetic", "mnist_photos", "real_photos"}
        assert set(run["metrics"]["mnist_photos"]) == {"pixel_acc", "miou", "digit_iou", "background_iou"}
        summary = json.loads((tmp_path / "scenes" / "runs" / f"{run['method']}_seed0" / "summary.json").read_text())
        for name in ("synthetic", "mnist_photos"):  # digit IoU: classes 1-10 present; background: class 0
            per_class = summary["selections"]["last"]["metrics"][name]["per_class_iou"]
            digits = [v for v in per_class[1:] if v is not None]
            assert run["metrics"][name]["digit_iou"] == pytest.approx(sum(digits) / len(digits))
            assert run["metrics"][name]["background_iou"] == pytest.approx(per_class[0])
    rows = (tmp_path / "scenes" / "runs" / "erm_seed0" / "results.jsonl").read_text().splitlines()
    curve = dict(saved["curves"]["erm"]["mnist_photos_digit_iou"])  # step -> mean digit IoU, beside the mIoU's
    for row in map(json.loads, rows):
        digits = [v for v in row["metrics"]["mnist_photos"]["per_class_iou"][1:] if v is not None]
        assert curve[row["step"]] == pytest.approx(sum(digits) / len(digits))
    assert {"curve_mnist_photos_digit.png", "curve_synthetic_background.png"} <= set(saved["plots"])
    md = (tmp_path / "scenes" / "report.md").read_text()
    step, peak = max(curve.items(), key=lambda kv: kv[1])  # "along training": the digit curve's peak and its step
    erm_row = next(line for line in md.split("Along training")[1].splitlines() if line.startswith("| erm |"))
    assert f"{100 * peak:.1f} ({step})" in erm_row and "mnist_photos digit IoU peak (step)" in md
    assert "mIoU" in md and "mnist_photos digit IoU" in md and "mnist_photos background IoU" in md
    run_md = (tmp_path / "scenes" / "runs" / "asg_seed0" / "report.md").read_text()
    assert "Per-class IoU" in run_md and "predictions.png" in run_md
    assert (tmp_path / "scenes" / "runs" / "asg_seed0" / "predictions.png").stat().st_size > 1000


def test_demo_tunes_every_method_with_one_study_each_on_source_val_only(tmp_path, monkeypatch, caches):
    """One study per trained method, the same budget; the choice is the best complete trial's source-val score,
    that trial is seed 0; WiSE-FT takes ERM's choice."""
    import dataclasses

    from asg import demo

    small = dataclasses.replace(demo.DIGITS, tune_trials=3, wise_ft_alphas=(0.0, 0.5, 1.0))
    monkeypatch.setitem(demo.BENCHMARKS, "digits", small)
    monkeypatch.setenv("XDG_CACHE_HOME", str(caches / "xdg"))
    over = [*TINY, f"data.root={caches}/c", "adapt.rounds=1", "adapt.steps_per_round=2", "train.eval_every=2"]
    run_demo(
        out=tmp_path,
        seeds=1,
        methods=["erm", "asg", "wise-ft"],
        overrides=over,
        benchmarks=["digits"],
        tune=True,
        jobs=1,
    )
    saved = json.loads((tmp_path / "digits" / "report.json").read_text())
    trials = saved["grid"]
    assert [(r["method"], r["trial"]) for r in trials] == [
        ("erm", 0),
        ("erm", 1),
        ("erm", 2),
        ("asg", 0),
        ("asg", 1),
        ("asg", 2),
    ]
    assert set(saved["tuning_cost"]) == {"erm", "asg"}
    for method in ("erm", "asg"):
        rows = [r for r in trials if r["method"] == method]
        assert {"optim.lr", "optim.backbone_lr_mult"} <= set(rows[0]["params"])  # the backbone rate is tuned
        done = [r for r in rows if r["state"] == "complete"]
        best = max(done, key=lambda r: (r["source_val"], -r["trial"]))  # source-val only, whatever the real sets say
        assert [r for r in rows if r["chosen"]] == [best]
        assert saved["choices"][method] == best["overrides"]
        assert saved["table"][method]["settings"]["backbone_lr_mult"] == best["params"]["optim.backbone_lr_mult"]
    assert "method.kl_weight" in next(r for r in trials if r["method"] == "asg")["params"]
    assert saved["choices"]["wise-ft"] == saved["choices"]["erm"]
    asg_best = next(r for r in trials if r["method"] == "asg" and r["chosen"])
    run = next(r for r in saved["runs"] if r["method"] == "asg")
    assert run["step"] == 4 and (tmp_path / "digits" / "tune" / "asg" / "trials").is_dir()
    assert asg_best["folder"].startswith(str(tmp_path / "digits" / "tune" / "asg"))  # seed 0 is the trial itself
    wise = next(r for r in saved["runs"] if r["method"] == "wise-ft")
    assert wise["wise_ft_alpha"] in (0.0, 0.5, 1.0)
    adaptations = saved["adaptations"]
    assert [(a["method"], a["seed"]) for a in adaptations] == [("erm", 0), ("asg", 0)]
    md = (tmp_path / "digits" / "report.md").read_text()
    assert "one Optuna study per method" in md and "**chosen**" in md and "full grid: steps" in md
    assert "mnist5k_test before" in md and f"| wise-ft (α {wise['wise_ft_alpha']:g}) |" in md


def test_backbone_rates_change_only_the_backbone_rate(tmp_path, monkeypatch, caches):
    """ERM and ASG at their chosen point, the rate's override last; a table and a figure of score and KL."""
    import yaml

    from asg.demo import backbone_rate

    monkeypatch.setattr(backbone_rate, "RATES", (0.1, 1.0))
    monkeypatch.setenv("XDG_CACHE_HOME", str(caches / "xdg"))
    over = [*TINY, f"data.root={caches}/c"]
    run_demo(
        out=tmp_path,
        seeds=1,
        methods=["erm", "asg"],
        overrides=over,
        benchmarks=["digits"],
        adapt=False,
        backbone_rates=True,
        jobs=1,
    )
    saved = json.loads((tmp_path / "digits" / "report.json").read_text())
    table = saved["backbone_rate"]["table"]
    assert set(table) == {"erm", "asg"} and set(table["asg"]) == {"0.1", "1"}
    for label in ("erm", "asg"):
        for rate in ("0.1", "1"):
            cfg = yaml.safe_load(
                (tmp_path / "digits" / "backbone_rate" / f"{label}_bb{rate}_seed0" / "config.yaml").read_text()
            )
            chosen = dict(o.split("=", 1) for o in dict(demo_chosen())[label])
            assert cfg["optim"]["backbone_lr_mult"] == float(rate)
            assert cfg["optim"]["lr"] == float(chosen["optim.lr"])  # the chosen point otherwise
            assert len(table[label][rate]["kl"]) == 1
    asg_cfg = yaml.safe_load((tmp_path / "digits" / "backbone_rate" / "asg_bb1_seed0" / "config.yaml").read_text())
    assert asg_cfg["method"]["kl_weight"] == float(
        dict(o.split("=", 1) for o in dict(demo_chosen())["asg"])["method.kl_weight"]
    )
    assert (tmp_path / "digits" / "backbone_rate.png").stat().st_size > 1000
    assert "The backbone rate alone" in (tmp_path / "digits" / "report.md").read_text()
