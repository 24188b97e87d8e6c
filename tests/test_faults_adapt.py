"""Faults of ``asg adapt`` (issue 18: cases 3 and 8)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import CrashAt, ImagesLabelsRaise, copy_run
from safetensors.torch import load_file, save_file

import asg
from asg.adapt import Adaptation
from asg.data import DataBundle
from asg.engine.rundir.folder import RunDir
from asg.errors import AsgError, WeightsError

SRC_DIR = str(Path(asg.__file__).resolve().parents[1])
TESTS_DIR = str(Path(__file__).resolve().parent)


def killed_training(out: Path, kill_at: int) -> None:
    """The tiny ERM run (6 steps, a checkpoint every 2) in a subprocess that SIGKILLs itself at step ``kill_at``."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {TESTS_DIR!r})
        from helpers import TINY_OVERRIDES, CrashAt, tiny_data
        from asg.config import load_config
        from asg.engine.trainer import Trainer
        cfg = load_config(None, TINY_OVERRIDES + ["method.name=erm", "train.steps=6"])
        Trainer(cfg, {str(out)!r}, data=tiny_data(), quiet=True, callbacks=[CrashAt({kill_at}, kill=True)]).fit()
    """)
    env = {**os.environ, "PYTHONPATH": SRC_DIR}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def adapt_config(tiny_bundle, tiny_config, init_from: Path, *extra: str):
    bundle = DataBundle(
        tiny_bundle.train,
        tiny_bundle.eval_sets,
        "source_val",
        tiny_bundle.class_names,
        target_sets={"real_adapt": ImagesLabelsRaise(tiny_bundle.eval_sets["real"])},
    )
    cfg = tiny_config(
        "method.name=erm",
        f"model.init_from={init_from}",
        "adapt.target=real_adapt",
        "adapt.rounds=1",
        "adapt.steps_per_round=2",
        "adapt.init_portion=0.5",
        *extra,
    )
    return cfg, bundle


@pytest.mark.slow
def test_adapt_refuses_a_killed_start_and_records_the_start_it_accepts(tiny_bundle, tiny_config, tmp_path, one_thread):
    """Case 3: the start run was killed at step 5 of 6 (last checkpoint: step 4, no 'done')."""
    src = tmp_path / "src"
    killed_training(src, kill_at=5)
    assert not (src / "done").exists() and RunDir(src).read_manifest()["step"] == 4
    cfg, bundle = adapt_config(tiny_bundle, tiny_config, src)
    with pytest.raises(WeightsError, match=r"never finished .*step 4.*--from-unfinished"):
        Adaptation(cfg, tmp_path / "a", data=bundle, quiet=True).run()
    with RunDir(src):  # a training that is running: refused even with the option
        cfg_ok, _ = adapt_config(tiny_bundle, tiny_config, src, "adapt.from_unfinished=true")
        with pytest.raises(WeightsError, match="being written by a running asg process"):
            Adaptation(cfg_ok, tmp_path / "a", data=bundle, quiet=True).run()
    result = Adaptation(cfg_ok, tmp_path / "a", data=bundle, quiet=True).run()
    init = result.start["init_weights"]
    assert (init["step"], init["finished"]) == (4, False) and len(init["sha256"]) == 64
    assert json.loads((tmp_path / "a" / "start.json").read_text())["init_weights"] == init
    assert json.loads((tmp_path / "a" / "adaptation.json").read_text())["start"]["init_weights"] == init
    assert "step 4, a run that never finished" in (tmp_path / "a" / "report.md").read_text()


@pytest.mark.slow
def test_resumed_adaptation_refuses_a_start_model_that_changed(tiny_bundle, tiny_config, tmp_path, erm_run, one_thread):
    src = copy_run(erm_run, tmp_path / "src")  # its weights are changed below
    cfg, bundle = adapt_config(tiny_bundle, tiny_config, src)
    Adaptation(cfg, tmp_path / "a", data=bundle, quiet=True).run()
    (tmp_path / "a" / "done").unlink()
    weights = RunDir(src).resolve("last")
    state = load_file(str(weights))
    state["head.0.bias"] += 1
    save_file(state, str(weights))
    with pytest.raises(AsgError, match="starting model changed since this adaptation began"):
        Adaptation(cfg, tmp_path / "a", data=bundle, quiet=True, resume=True).run()


@pytest.mark.slow
def test_damaged_pseudo_labels_on_resume_are_computed_again(
    tiny_bundle, tiny_config, tmp_path, capsys, erm_run, one_thread
):
    """Case 8: pseudo_labels.npz damaged while the round was stopped: the resume labels again, same result."""
    from asg.adapt.pseudo import DamagedPseudoLabels, load_pseudo_labels

    cfg, bundle = adapt_config(tiny_bundle, tiny_config, erm_run, "adapt.steps_per_round=4")
    Adaptation(cfg, tmp_path / "a", data=bundle, quiet=True).run()
    with pytest.raises(KeyboardInterrupt):
        Adaptation(cfg, tmp_path / "b", data=bundle, quiet=True, callbacks=[CrashAt(3)]).run()
    npz = tmp_path / "b" / "round_01" / "pseudo_labels.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0x10
    npz.write_bytes(bytes(data))
    with pytest.raises(DamagedPseudoLabels, match="does not match its checksum"):
        load_pseudo_labels(npz.parent)
    npz.write_bytes(bytes(data[:100]))
    with pytest.raises(DamagedPseudoLabels):
        load_pseudo_labels(npz.parent)
    capsys.readouterr()
    Adaptation(cfg, tmp_path / "b", data=bundle, resume=True).run()
    assert "pseudo-labels are computed again" in capsys.readouterr().err
    a = load_file(str(tmp_path / "a" / "round_01" / "last.safetensors"))
    b = load_file(str(tmp_path / "b" / "round_01" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
