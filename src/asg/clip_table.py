"""``asg clip-table``: the VisDA-17 table of CLIP ViT-B/16 a person would publish, from one command.

Rows, all on the same split (VisDA-17 train minus its source-val part -> ``visda17_val``) and protocol (the
recipes' evaluation: 224 px, flip TTA with sigmoid averaging, mean per-class accuracy):

    zero-shot                     CLIP's text tower over the 12 class names, no training (``asg.zero_shot``)
    linear probe                  a linear head on the frozen image tower (visda17_clip_vitb16_probe)
    fine-tune                     full fine-tuning (visda17_clip_vitb16_erm)
    fine-tune + proxy KL          ASG's KL against CLIP's zero-shot ImageNet head (visda17_clip_vitb16_asg)
    WiSE-FT                       the fine-tuned run's backbone interpolated towards CLIP's, alpha chosen on
                                  source-val (``asg.methods.wise_ft``)
    CSG                           contrastive guidance by the frozen image tower (visda17_clip_vitb16_csg)

Each trained row is a run folder ``OUT/<recipe>``; a finished one is read, not trained again, and an unfinished
one is resumed, so the command can be stopped and started again. Published reference points (CLIP ViT-B/16):
zero-shot 88.7, fine-tuned on the synthetic images 80.5. The table reports the last checkpoint (no early stopping)
and the one chosen on source-val; no row reads the real labels to choose anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asg.errors import AsgError
from asg.io import atomic_write

REAL_SET = "visda17_val"


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # "zero_shot" | "train" | "wise_ft"
    recipe: str  # the recipe it trains or evaluates (WiSE-FT: the fine-tuned run's)


ROWS = (
    Row("zero-shot", "zero_shot", "visda17_clip_vitb16_erm"),
    Row("linear probe", "train", "visda17_clip_vitb16_probe"),
    Row("fine-tune", "train", "visda17_clip_vitb16_erm"),
    Row("fine-tune + proxy KL (CLIP zero-shot head)", "train", "visda17_clip_vitb16_asg"),
    Row("WiSE-FT", "wise_ft", "visda17_clip_vitb16_erm"),
    Row("CSG", "train", "visda17_clip_vitb16_csg"),
)
PUBLISHED = {"zero-shot": 88.7, "fine-tune": 80.5}  # CLIP ViT-B/16 on VisDA-17 real, as published


def run_clip_table(
    out: str | Path,
    overrides: list[str] | None = None,
    rows: tuple[Row, ...] = ROWS,
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    quiet: bool = False,
) -> dict[str, Any]:
    """Train and evaluate every row into ``out`` (``overrides``, e.g. ``data.root=...`` and ``model.weights=...``,
    apply to every recipe); write ``out/table.md`` and ``out/table.json``; return the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or [])
    table = []
    for row in rows:
        scores = _row(row, out, overrides, alphas, quiet)
        table.append(
            {
                "label": row.label,
                "recipe": row.recipe,
                "kind": row.kind,
                **scores,
                "published": PUBLISHED.get(row.label),
            }
        )
    from asg.tasks import CLASSIFICATION

    result = {"set": REAL_SET, "metric": CLASSIFICATION.primary_metric, "overrides": overrides, "rows": table}
    atomic_write(out / "table.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    markdown = table_markdown(result)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(markdown))
    result["markdown"] = markdown
    return result


def _row(row: Row, out: Path, overrides: list[str], alphas: tuple[float, ...], quiet: bool) -> dict[str, Any]:
    if row.kind == "zero_shot":
        return _zero_shot(row, out, overrides, quiet)
    run = out / row.recipe
    if row.kind == "train":
        _train(row.recipe, run, overrides, quiet)
        return _run_scores(run)
    if row.kind == "wise_ft":
        _train(row.recipe, run, overrides, quiet)  # the fine-tune row's run (trained once)
        return _wise_ft(run, out, overrides, alphas)
    raise AsgError(f"unknown CLIP-table row kind {row.kind!r}")


def _train(recipe: str, run: Path, overrides: list[str], quiet: bool) -> None:
    from asg.api import train
    from asg.engine.rundir.folder import RunDir

    if run.is_dir() and RunDir(run).is_done():
        return
    resume = run.is_dir() and (run / "config.yaml").is_file() and (run / "checkpoint.json").is_file()
    train(recipe, overrides, out=run, resume=resume, quiet=quiet)


def _run_scores(run: Path) -> dict[str, Any]:
    from asg.compare import read_run

    scores = read_run(run).scores.get(REAL_SET, {})
    return {"last": _pct(scores.get("last")), "source_val": _pct(scores.get("source-val")), "run": str(run)}


def _zero_shot(row: Row, out: Path, overrides: list[str], quiet: bool) -> dict[str, Any]:
    from asg.api import save_evaluation
    from asg.tasks import CLASSIFICATION
    from asg.zero_shot import evaluate_zero_shot

    folder = out / "zero_shot"
    done = folder / "zero_shot.json"
    if done.is_file():
        result = json.loads(done.read_text())
    else:
        result = evaluate_zero_shot(row.recipe, overrides, show_progress=not quiet)
        save_evaluation(result, folder)
        atomic_write(done, lambda tmp: Path(tmp).write_text(json.dumps(result)))
    value = _pct(result["sets"][REAL_SET][CLASSIFICATION.primary_metric])
    return {"last": value, "source_val": value, "run": str(folder)}


def _wise_ft(run: Path, out: Path, overrides: list[str], alphas: tuple[float, ...]) -> dict[str, Any]:
    """WiSE-FT of the fine-tuned run's last and source-val checkpoints, alpha chosen on source-val each time."""
    from asg.api import evaluate_wise_ft
    from asg.methods.wise_ft import choose_alpha
    from asg.tasks import CLASSIFICATION

    metric = CLASSIFICATION.primary_metric
    done = out / "wise_ft.json"
    if done.is_file():
        return json.loads(done.read_text())
    scores: dict[str, Any] = {"run": str(run)}
    for checkpoint, key in (("last", "last"), ("source-val", "source_val")):
        per_alpha = evaluate_wise_ft(run, alphas, checkpoint, overrides=overrides)
        source = [n for n, r in next(iter(per_alpha.values())).items() if r["role"] == "source-val"]
        if not source:
            raise AsgError("WiSE-FT chooses alpha on the source-val split: set data.source_val_fraction above 0")
        alpha = choose_alpha({a: sets[source[0]][metric] for a, sets in per_alpha.items()})
        scores[key] = _pct(per_alpha[alpha][REAL_SET][metric])
        scores[f"{key}_alpha"] = alpha
    atomic_write(done, lambda tmp: Path(tmp).write_text(json.dumps(scores)))
    return scores


def _pct(value: float | None) -> float | None:
    return None if value is None else round(100 * float(value), 2)


def table_markdown(result: dict[str, Any]) -> str:
    """The table as Markdown: one line per row, the real set's mean per-class accuracy (%) at the last checkpoint
    and at the source-val choice, and the published number where there is one."""

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"VisDA-17 {result['set']}, mean per-class accuracy (%), CLIP ViT-B/16",
        "",
        "| method | last | source-val choice | published |",
        "|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        label = r["label"]
        if r["kind"] == "wise_ft" and r.get("last_alpha") is not None:
            label += f" (alpha {r['last_alpha']:g} / {r['source_val_alpha']:g})"
        lines.append(f"| {label} | {cell(r['last'])} | {cell(r['source_val'])} | {cell(r.get('published'))} |")
    return "\n".join(lines) + "\n"


def add_clip_table_parser(sub: Any, add_set: Any) -> None:
    """``asg clip-table`` (registered by :mod:`asg.cli`)."""
    p = sub.add_parser("clip-table", help="the VisDA-17 table of CLIP ViT-B/16: zero-shot, probe, fine-tune, ...")
    p.add_argument("--root", default=None, help="the VisDA-17 folder (= --set data.root=...)")
    p.add_argument("--weights", default=None, help="the open_clip ViT-B/16 file (= --set model.weights=...)")
    p.add_argument("--out", type=Path, default=Path("runs/clip_table"), help="folder of the rows' runs and table")
    add_set(p, "override every row's recipe, e.g. --set train.steps=1000")


def clip_table_command(args: Any) -> int:
    overrides = list(args.overrides)
    if args.root is not None:
        overrides.insert(0, f"data.root={args.root}")
    if args.weights is not None:
        overrides.insert(0, f"model.weights={args.weights}")
    result = run_clip_table(args.out, overrides)
    print(result["markdown"])
    print(f"table: {args.out}/table.md")
    return 0
