import json

import pytest
import yaml

from asg.cli import main


def _recipe(tmp_path):
    recipe = {
        "inherit": "digits_base.yaml",
        "data": {
            "root": str(tmp_path / "cache"),
            "num_train": 200,
            "image_size": 32,
            "batch_size": 16,
            "eval_max_per_set": 40,
        },
        "method": {"name": "asg", "kl_weight": 1.0},
        "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "progress": False},
        "eval": {"retention": True, "full_eval_selected": False},
    }
    from asg.recipe_files import recipe_path

    path = tmp_path / "tiny.yaml"
    recipe["inherit"] = str(recipe_path("digits_base"))
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_cli_train_then_evaluate_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    # the real sets' test halves (2500 MNIST images, not 5000: evaluate's full sets cost half as much)
    sets = ["--set", "train.seed=3", "--set", "data.real_split=halves"]
    assert main(["train", "--config", str(_recipe(tmp_path)), "--out", str(out), *sets]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["seed"] == 3 and saved["method"]["name"] == "asg"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert set(rows[0]["metrics"]) == {"synthetic", "mnist5k_test", "uci_digits_test"}
    summary = json.loads((out / "summary.json").read_text())
    last = summary["selections"]["last"]
    assert set(last["metrics"]["real_photos"]) == {"top1_agreement", "kl"}
    assert (out / "done").exists()
    timing = summary["timing"]  # where the time went: each phase timed where it happens
    assert timing["steps"] == 4 and timing["first_step"] == 0 and timing["peak_rss_mib"] > 0
    assert all(timing[f"{p}_s"] > 0 for p in ("setup", "train_step", "checkpoint", "eval", "final"))
    assert timing["train_step_s"] + timing["eval_s"] + timing["final_s"] < timing["wall_s"]
    assert "## Where the time went" in (out / "report.md").read_text()
    assert "time: 4 steps in" in capsys.readouterr().out

    assert main(["evaluate", str(out), "--checkpoint", "source-val", "--tta-flip"]) == 0
    printed = capsys.readouterr().out
    assert "tta_flip=True" in printed and "mnist5k_test" in printed
    result = json.loads((out / "eval_source_val_tta.json").read_text())
    assert result["sets"]["mnist5k_test"]["n"] == 2500  # evaluate uses the full sets (training: 40 images a set)
    assert (out / "confusion_source_val_tta_mnist5k_test.png").exists()


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asg: error:") and "missing.yaml" in err and "Traceback" not in err
    assert main(["train", "--config", str(_recipe(tmp_path)), "--set", "method.name=magic"]) == 2
    assert "magic" in capsys.readouterr().err
    assert main(["train", "--config", str(_recipe(tmp_path)), "--set", "model.weights=/no/such.pth"]) == 2
    assert "/no/such.pth" in capsys.readouterr().err


def test_cli_data_check_reports_file_and_line(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "validation").mkdir()
    (tmp_path / "train" / "image_list.txt").write_text("a.png 0\nb.png x\n")
    (tmp_path / "validation" / "image_list.txt").write_text("")
    assert main(["data", "check", "visda17", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path}/train/image_list.txt:2" in out and "FAILED" in out
    assert "a.png" in out  # the missing image is named
