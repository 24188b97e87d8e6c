"""Loading a recipe knows no plug-in: ``asg.config`` validates without torch; the registries' names are checked
where things are built (``asg.registries``), with the same message at the same moment for the commands."""

import subprocess
import sys

import pytest

from asg.cli import main
from asg.config import load_config
from asg.errors import ConfigError
from asg.registries import load_checked_config


@pytest.mark.slow
def test_loading_and_validating_a_recipe_imports_no_torch():
    code = (
        "import sys; import asg.config; "
        "cfg = asg.config.load_config('digits_asg', ['train.steps=5', 'optim.lr=0.01']); "
        "asg.config.validate(cfg); "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'asg'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "asg.config" in loaded and not [m for m in loaded if not m.startswith("asg")], loaded


def test_registry_names_are_checked_where_things_are_built():
    cfg = load_config(None, ["method.name=ersm"])  # validation alone does not know the plug-ins
    assert cfg.method.name == "ersm"
    with pytest.raises(ConfigError, match="l2o.controller: 'magic' is not one of fixed, l2o, random"):
        load_checked_config(None, ["l2o.controller=magic"])
    for key, value in (("method.name", "ersm"), ("data.name", "digitz"), ("l2o.reward", "joy")):
        with pytest.raises(ConfigError, match=f"{key}: '{value}' is not one of"):
            load_checked_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("command", [["train"], ["adapt"], ["l2o", "train"]])
def test_an_unknown_name_stops_the_command_before_its_folder_exists(tmp_path, capsys, command):
    out = tmp_path / "run"
    argv = [*command, "--config", "digits_asg", "--out", str(out), "--set", "method.name=ersm"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("asg: error: method.name: 'ersm' is not one of asg, csg, erm, feature, l2sp, lpft")
    assert not out.exists()
