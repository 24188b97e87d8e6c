"""One run on several processes: 2 spawned processes (torch.distributed, Gloo on the CPU) against 1 process.

All runs are made once, by a module fixture: in this process (world 1) and in one spawn of 2 processes that
run their jobs one after another in the same process group. Each test then checks one property.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp
from helpers import TINY_OVERRIDES, CrashAt, tiny_data

from asg.config import load_config
from asg.engine.callbacks import Callback
from asg.engine.distributed import Dist
from asg.engine.sampler import EpochBatchSampler, ShardedBatchSampler
from asg.engine.trainer import Trainer
from asg.errors import AsgError, TrainingDiverged

pytestmark = pytest.mark.slow  # end-to-end runs and spawned processes: `make test` runs them, `-m "not slow"` skips

OVERRIDES = [
    *TINY_OVERRIDES,  # data.batch_size=8 is the global batch: 4 images per process with 2
    "method.kl_cap=0.0005",  # binds from step 3: decided on one process's KL it would differ from the global one
]
# Not bitwise: 2 processes add the per-image gradients in another order than 1 process does. In float32 those
# 1e-7 differences do not stay small here: at 32 px the last blocks see 1x1 maps, so a ReLU6 input pushed across
# a kink flips a whole term of a gradient (measured: 20-30% of some gradients at step 3). The runs are therefore
# made in float64 (differences ~1e-15), and the losses, computed in float32 by the methods, agree to ~1e-7.
RTOL, ATOL = 1e-6, 1e-9
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _train(out: Path, *, resume: bool = False, crash_at: int | None = None, nan_at: int | None = None) -> dict:
    """Train (or resume) the tiny run in ``out``; ``crash_at``/``nan_at``: interrupt before, or give rank 1 a
    NaN loss in, that 1-based step. Returns the per-step losses, final weights, error and evaluations."""
    losses: list[float] = []

    class RecordLosses(Callback):
        def on_step_end(self, trainer, out):
            losses.append(out.logs["loss"])

    callbacks = [RecordLosses(), *([CrashAt(crash_at - 1)] if crash_at is not None else [])]
    trainer = Trainer(
        load_config(None, OVERRIDES), out, data=tiny_data(), quiet=True, resume=resume, callbacks=callbacks
    )
    if nan_at is not None and trainer.dist.rank == 1:
        forward = trainer.method.forward_loss

        def poisoned(model, batch):
            lo = forward(model, batch)
            if torch.is_grad_enabled() and trainer.step + 1 == nan_at:  # the step, not the check before saving
                lo.loss = lo.loss * float("nan")
            return lo

        trainer.method.forward_loss = poisoned
    record = {"losses": losses, "error": None, "world": trainer.dist.world}
    try:
        trainer.fit()
    except (KeyboardInterrupt, TrainingDiverged) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["state"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    if record["error"] is None:
        sets = trainer.data.eval_sets
        record["sharded"] = {k: r.confusion for k, r in trainer.evaluator.evaluate_sharded(sets).items()}
        record["full"] = {k: r.confusion for k, r in trainer.evaluator.evaluate(sets).items()}
    return record


def _worker(rank: int, port: int, jobs: list[tuple[str, dict]], root: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    for name, options in jobs:
        torch.save(_train(root / name, **options), root / f"{name}.rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_two(jobs: list[tuple[str, dict]], root: Path, timeout: float = 240) -> None:
    context = mp.spawn(_worker, args=(_free_port(), jobs, root), nprocs=2, join=False)
    deadline = time.time() + timeout
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the 2-process runs did not finish in {timeout} s (a deadlock?)")


class _NoCollectives:
    """Makes every torch.distributed call that asg uses fail, and lists the calls."""

    names = ("init_process_group", "all_reduce", "broadcast", "all_gather_object", "barrier")

    def __enter__(self):
        self.calls, self.saved = [], {n: getattr(td, n) for n in self.names}
        for n in self.names:
            setattr(td, n, self._refuse(n))
        return self

    def _refuse(self, name):
        def refuse(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"torch.distributed.{name} called by a single-process run")

        return refuse

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(td, n, fn)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    saved_env = {k: os.environ.pop(k) for k in TORCHRUN_ENV if k in os.environ}
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        with _NoCollectives() as guard:
            out = {"ref": _train(root / "ref"), "one_then_two.1": _train(root / "one_then_two", crash_at=3)}
        out["single_process_collectives"] = guard.calls
        jobs = [
            ("two", {}),
            ("two_then_one", {"crash_at": 3}),
            ("one_then_two", {"resume": True}),
            ("nan", {"nan_at": 3}),
        ]
        _spawn_two(jobs, root)
        for name, _ in jobs:
            out[name] = [torch.load(root / f"{name}.rank{r}.pt", weights_only=False) for r in (0, 1)]
        out["two_then_one.2"] = _train(root / "two_then_one", resume=True)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        os.environ.update(saved_env)
    out["root"] = root
    return out


def _assert_close_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


def test_ranks_keep_identical_parameters(runs):
    for name in ("two", "one_then_two"):
        rank0, rank1 = runs[name]
        assert rank0["error"] is None and rank1["error"] is None
        for k, v in rank0["state"].items():
            assert torch.equal(v, rank1["state"][k]), f"{name}: {k} differs between the ranks"
        assert rank0["losses"] == rank1["losses"]  # the logged loss is the mean over both ranks


def test_two_processes_follow_one_process_with_the_same_global_batch(runs):
    ref, (two, _) = runs["ref"], runs["two"]
    assert two["world"] == 2 and ref["world"] == 1
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(ref["losses"]), rtol=RTOL, atol=0)
    _assert_close_states(two["state"], ref["state"])
    at_step_2 = runs["one_then_two.1"]["state"]  # steps 3 and 4 moved the weights far more than the tolerance
    assert max(float((v - at_step_2[k]).abs().max()) for k, v in ref["state"].items() if v.is_floating_point()) > 1e-3


def test_sharded_evaluation_sums_to_the_full_evaluation(runs):
    for rank in runs["two"]:
        for name, confusion in rank["full"].items():
            assert (rank["sharded"][name] == confusion).all(), name
            assert confusion.sum() == 12
    rows = [json.loads(line) for line in (runs["root"] / "two" / "results.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4] and all(row["world_size"] == 2 for row in rows)


def test_resume_across_world_sizes_continues_the_run(runs):
    ref = runs["ref"]
    assert runs["two_then_one"][0]["error"].startswith("KeyboardInterrupt")
    assert runs["one_then_two.1"]["error"].startswith("KeyboardInterrupt")
    for resumed in (runs["two_then_one.2"], runs["one_then_two"][0]):
        assert resumed["error"] is None
        torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(ref["losses"][2:]), rtol=RTOL, atol=0)
        _assert_close_states(resumed["state"], ref["state"])
    for name, worlds in (("two_then_one", [2, 1]), ("one_then_two", [1, 2])):
        rows = [json.loads(line) for line in (runs["root"] / name / "resumes.jsonl").read_text().splitlines()]
        assert rows == [{"step": 2, "world_size": worlds}]
        assert json.loads((runs["root"] / name / "summary.json").read_text())["world_size"] == worlds[1]


def test_nan_on_one_rank_stops_every_rank_alike(runs):
    rank0, rank1 = runs["nan"]
    assert rank0["error"].startswith("TrainingDiverged: non-finite loss at step 3")
    assert rank0["error"] == rank1["error"]
    assert "last good checkpoint (step 2" in rank0["error"]
    folder = runs["root"] / "nan"
    assert json.loads((folder / "checkpoint.json").read_text())["step"] == 2
    assert not (folder / "done").exists()
    assert all(torch.equal(v, rank1["state"][k]) for k, v in rank0["state"].items())


def test_without_torchrun_env_one_process_calls_no_collective(runs, monkeypatch):
    assert runs["ref"]["world"] == 1 and runs["single_process_collectives"] == []
    assert not td.is_initialized()
    assert json.loads((runs["root"] / "ref" / "versions.json").read_text())["world_size"] == 1
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    d = Dist.from_env("cpu")
    t = torch.ones(3)
    assert d == Dist() and d.is_main and d.all_reduce_sum(t) is t and d.broadcast(t) is t
    assert d.shard(5) == range(5) and d.weighted_mean({"loss": torch.tensor(2.0)}, 0.0) == {"loss": 2.0}
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(AsgError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set.*torchrun"):
        Dist.from_env("cpu")


def test_shards_split_each_global_batch_and_keep_its_seeds():
    sampler = EpochBatchSampler(10, 4, seed=3, total_steps=6, with_seeds=True)  # batches of 4, 4, 2 per epoch
    shards = [ShardedBatchSampler(sampler, rank, 3) for rank in range(3)]
    parts = [list(s) for s in shards]
    for step, batch in enumerate(sampler):
        owned = [parts[r][step] for r in range(3) if shards[r].has_share(step)]
        assert sorted(item for part in owned for item in part) == sorted(batch)  # (index, seed of the global slot)
        assert all(parts[r][step] == batch[r::3] or parts[r][step] == batch[:1] for r in range(3))
    assert [shards[2].has_share(step) for step in range(6)] == [True, True, False] * 2
    assert len(shards[1]) == len(sampler) == 6


def test_python_m_asg_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "asg", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--config" in done.stdout


def _dying_worker(rank: int, port: int, out: Path) -> None:
    """Rank 1 exits abruptly (no Python clean-up) in step 3; rank 0 records what it raised."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    rank_1_dies = CrashAt(2, kill=True, when=lambda trainer: trainer.dist.rank == 1)  # in step 3
    trainer = Trainer(load_config(None, OVERRIDES), out, data=tiny_data(), quiet=True, callbacks=[rank_1_dies])
    try:
        trainer.fit()
        message = "finished"
    except AsgError as exc:
        message = f"AsgError: {exc}"
    except Exception as exc:  # anything else is what this test forbids
        message = f"{type(exc).__name__}: {exc}"
    (out.parent / "rank0_error.txt").write_text(message)


def test_a_rank_that_dies_stops_the_others_with_a_message_and_an_intact_checkpoint(tmp_path):
    saved_env = {k: os.environ.pop(k) for k in TORCHRUN_ENV if k in os.environ}
    try:
        context = mp.spawn(_dying_worker, args=(_free_port(), tmp_path / "run"), nprocs=2, join=False)
        deadline = time.time() + 180
        while not all(p.exitcode is not None for p in context.processes):
            if time.time() > deadline:
                for p in context.processes:
                    p.kill()
                pytest.fail("rank 0 kept waiting for the dead rank")
            time.sleep(0.5)
    finally:
        os.environ.update(saved_env)
    assert [p.exitcode for p in context.processes] == [0, -signal.SIGKILL]
    message = (tmp_path / "rank0_error.txt").read_text()
    assert message.startswith("AsgError: process 0 of 2: the all_reduce"), message
    assert "failed because another process of the run stopped" in message and "--resume" in message
    assert "pair.cc" not in message
    manifest = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert manifest["step"] == 2 and not (tmp_path / "run" / "done").exists()
    assert not list((tmp_path / "run").glob("*.tmp*"))
    Trainer(load_config(None, OVERRIDES), tmp_path / "run", data=tiny_data(), quiet=True, resume=True).fit()
    assert (tmp_path / "run" / "done").exists()


def test_commands_other_than_train_refuse_torchrun(monkeypatch, capsys):
    from asg.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["adapt", "--config", "digits_cbst", "--out", "unused"]) == 2
    assert "asg adapt runs on one process; under torchrun only `asg train`" in capsys.readouterr().err
