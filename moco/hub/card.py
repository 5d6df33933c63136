"""A model card (the Hub's ``README.md``) written from the run itself.

:func:`summarize_run` reads the run folder of an exported checkpoint: the recipe (the
settings recorded in the checkpoint, else ``config.yaml``), the pairs seen at that epoch
(``step`` x batch, from ``metrics.jsonl``), the kNN monitor's figures at that epoch with its
settings, and the linear-classification results of every ``moco lincls`` run of that
checkpoint found beside it (``lincls.json`` + ``metrics.jsonl``), each with the command that
measured it. :func:`model_card` writes the card: YAML front matter the Hub reads (licence,
library, tags, pipeline), what the model is, the recipe, the results table, how to load it.
Paths are reduced to folder and file names: a card is public.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moco.hub.networks import ModelInfo

#: The recipe settings shown in the card and config.json (the rest are machine settings).
RECIPE_KEYS = ("arch", "cifar_stem", "epochs", "batch_size", "lr", "lr_scale", "cos",
               "schedule", "warmup_epochs", "momentum", "wd", "moco_dim", "moco_k", "moco_m",
               "moco_t", "mlp", "aug", "image_size", "crop_min_scale", "symmetric",
               "shuffle_bn", "bn_splits", "mechanism", "method", "seed", "precision")


@dataclass
class Figure:
    """One measured accuracy (%): what, the settings, the command that measured it."""

    evaluation: str
    top1: float
    top5: float | None
    settings: str
    command: str


@dataclass
class RunSummary:
    data: str | None = None
    epoch: int | None = None
    pairs_seen: int | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _name(path: Any) -> str | None:
    return Path(str(path)).name if path else None


def _run_config(checkpoint: Path, recorded: dict[str, Any] | None) -> dict[str, Any]:
    if recorded:
        return dict(recorded)
    try:
        cfg = yaml.safe_load((checkpoint.parent / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _knn_figure(rec: dict[str, Any], cfg: dict[str, Any], data: str) -> Figure:
    bank, query = cfg.get("knn_bank_images") or 0, cfg.get("knn_query_images") or 0
    subset = (f", {bank or 'all'} bank / {query or 'all'} query images (class-balanced)"
              if bank or query else ", all train vs all val/test images")
    settings = (f"the run's kNN monitor: weighted kNN, k {cfg.get('knn_k', '?')}, t "
                f"{cfg.get('knn_t', '?')}, "
                f"{cfg.get('knn_features', 'backbone')} features{subset}, after epoch "
                f"{rec.get('epoch')}")
    return Figure("kNN monitor", float(rec["knn_top1"]),
                  float(rec["knn_top5"]) if rec.get("knn_top5") is not None else None, settings,
                  f"moco pretrain {shlex.quote(data)} --config config.yaml")


def _lincls_command(s: dict[str, Any], checkpoint: str) -> str:
    parts = ["moco lincls", shlex.quote(_name(s.get("data")) or "DATA"), "--pretrained",
             shlex.quote(checkpoint), "--epochs", str(s.get("epochs")), "-b",
             str(s.get("batch_size")), "--lr", str(s.get("lr")), "--wd", str(s.get("wd")),
             "--momentum", str(s.get("momentum")), "--seed", str(s.get("seed"))]
    if s.get("cos"):
        parts.append("--cos")
    elif s.get("schedule"):
        parts += ["--schedule", *map(str, s["schedule"])]
    if s.get("fast"):
        parts.append("--fast")
    if s.get("image_size"):
        parts += ["--image-size", str(s["image_size"])]
    return " ".join(parts)


def _lincls_figure(folder: Path, checkpoint: Path) -> Figure | None:
    try:
        s = json.loads((folder / "lincls.json").read_text())
    except (OSError, ValueError):
        return None
    records = [r for r in _jsonl(folder / "metrics.jsonl") if "acc1" in r]
    if not isinstance(s, dict) or not records:
        return None
    best = max(records, key=lambda r: float(r["acc1"]))
    epochs = s.get("epochs")
    settings = (f"linear classifier on frozen features ({'cosine' if s.get('cos') else 'step'} "
                f"lr {s.get('lr')}, batch {s.get('batch_size')}, {len(records)} of {epochs} "
                f"epochs{', features computed once' if s.get('fast') else ''}), best val top-1 "
                f"(epoch {best.get('epoch')}) as main_lincls.py reports")
    return Figure("linear classification", float(best["acc1"]),
                  float(best["acc5"]) if best.get("acc5") is not None else None, settings,
                  _lincls_command(s, checkpoint.name))


def find_lincls(checkpoint: Path) -> list[Path]:
    """The ``moco lincls`` output folders of ``checkpoint`` in its run folder (the folder
    itself and its sub-folders): those whose ``lincls.json`` names it as ``pretrained``."""
    run = checkpoint.parent
    found = []
    for f in sorted([run / "lincls.json", *run.glob("*/lincls.json")]):
        try:
            pre = json.loads(f.read_text()).get("pretrained")
        except (OSError, ValueError, AttributeError):
            continue
        if pre and Path(pre).name == checkpoint.name and (
                not Path(pre).is_absolute() or Path(pre).resolve() == checkpoint.resolve()):
            found.append(f.parent)
    return found


def summarize_run(checkpoint: Path | None, recorded: dict[str, Any] | None,
                  epoch: int | None, lincls: list[Path] | None = None) -> RunSummary:
    """What the run of ``checkpoint`` says about it (see the module docstring)."""
    if checkpoint is None:
        return RunSummary(recipe={k: v for k, v in (recorded or {}).items() if k in RECIPE_KEYS})
    cfg = _run_config(checkpoint, recorded)
    data = _name(cfg.get("data")) or "DATA"
    out = RunSummary(data=_name(cfg.get("data")), epoch=epoch,
                     recipe={k: cfg[k] for k in RECIPE_KEYS if k in cfg})
    records = [r for r in _jsonl(checkpoint.parent / "metrics.jsonl") if "epoch" in r]
    at = [r for r in records if epoch is None or r["epoch"] <= epoch]
    if at:
        rec = at[-1]
        if rec.get("step") is not None and cfg.get("batch_size"):
            out.pairs_seen = int(rec["step"]) * int(cfg["batch_size"])
        if rec.get("knn_top1") is not None:
            out.figures.append(_knn_figure(rec, cfg, data))
    for folder in (find_lincls(checkpoint) if lincls is None else lincls):
        fig = _lincls_figure(Path(folder), checkpoint)
        if fig is not None:
            out.figures.append(fig)
    return out


def _front_matter(info: ModelInfo, licence: str) -> str:
    tags = ["moco", "self-supervised-learning", "image-feature-extraction",
            info.method.lower().replace(" ", "") if info.method.startswith("MoCo") else "moco"]
    meta: dict[str, Any] = {"license": licence}
    if info.timm_compatible:
        meta["library_name"] = "timm"
        tags.append("timm")
    meta["pipeline_tag"] = "image-feature-extraction"
    meta["tags"] = list(dict.fromkeys(tags))
    if info.released is not None:
        meta["datasets"] = ["imagenet-1k"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _model_rows(info: ModelInfo, summary: RunSummary, licence: str) -> list[str]:
    from moco.data.recipes import eval_resize_size

    same = f"; timm's `{info.arch}` is the same network" if info.family == "torchvision" \
        and info.timm_compatible else ""
    names = "timm's" if info.family == "timm" else "torchvision's"
    args = f" with {json.dumps(info.model_args)}" if info.model_args else ""
    stem = ", CIFAR stem (3x3 conv1, no max-pool)" if info.cifar_stem else ""
    rows = [
        ("architecture", f"`{info.arch}`{args}{stem} ({names} tensor names{same})"),
        ("output", f"features [B, {info.feature_dim}] (no classifier head)"),
        ("input", f"{info.image_size} x {info.image_size} RGB: resize the short side to "
                  f"{eval_resize_size(info.image_size)}, center crop, mean "
                  f"{list(info.mean)}, std {list(info.std)}"),
        ("method", info.method),
    ]
    if summary.data:
        rows.append(("pretraining data", f"`{summary.data}` (the run's data folder)"))
    if summary.epoch is not None or info.epochs is not None:
        ep = summary.epoch if summary.epoch is not None else info.epochs
        pairs = f" ({summary.pairs_seen:,} image pairs seen)" if summary.pairs_seen else ""
        rows.append(("pretraining epochs", f"{ep}{pairs}"))
    rows.append(("licence", licence))
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _results(info: ModelInfo, summary: RunSummary) -> list[str]:
    out = ["## Results", ""]
    if summary.figures:
        out += ["Measured on this run (accuracies in %):", "",
                "| evaluation | top-1 | top-5 | settings | command |", "|---|---|---|---|---|"]
        for f in summary.figures:
            top5 = f"{f.top5:.2f}" if f.top5 is not None else "-"
            out.append(f"| {f.evaluation} | {f.top1:.2f} | {top5} | {f.settings} | "
                       f"`{f.command}` |")
    elif info.released is None:
        out.append("No evaluation of this checkpoint was found in its run folder: measure one "
                   "with `moco knn DATA --pretrained FILE` or `moco lincls DATA --pretrained "
                   "FILE` and export again.")
    w = info.released
    if w is not None:
        paper = f" (the paper: {w.paper_top1})" if w.paper_top1 not in (None, w.top1) else ""
        out += [f"Reported by the authors: ImageNet-1k linear top-1 **{w.top1}%**{paper}, "
                f"from {w.top1_source}. Paper: {w.paper}. Released at {w.url} "
                f"(checksum: {w.checksum_text}; {w.note}).", ""]
    return out


def _usage(info: ModelInfo, repo_id: str | None) -> list[str]:
    where = repo_id or "OWNER/NAME"
    out = ["## How to use", "", "```python", "import moco", "",
           f'model = moco.from_pretrained("{where}")  # or the local folder; [B, 3, '
           f"{info.image_size}, {info.image_size}] -> [B, {info.feature_dim}]",
           "features = model(model.transform(image).unsqueeze(0))  # image: a PIL image",
           f'classifier = moco.from_pretrained("{where}", num_classes=10)  # a fresh head', "```"]
    if info.timm_compatible:
        out += ["", "With timm (the same files):", "", "```python", "import timm", "",
                f'model = timm.create_model("hf-hub:{where}", pretrained=True).eval()  # features',
                'model = timm.create_model("local-dir:FOLDER", pretrained=True).eval()  # a folder',
                "```"]
    return out


def model_card(info: ModelInfo, summary: RunSummary, *, licence: str = "other",
               repo_id: str | None = None, source: str = "") -> str:
    """The ``README.md`` of a Hub model folder (see the module docstring)."""
    title = f"{info.method} {info.arch}" + (f": {info.released.name}" if info.released else "")
    origin = f" from `{source}`" if source else ""
    lines = [_front_matter(info, licence), f"# {title}", "",
             f"A `{info.arch}` backbone pretrained with {info.method}, self-supervised (no labels), "
             f"exported{origin} with `moco export --format hf` of the momentum-contrast library.",
             "", "## Model", "", *_model_rows(info, summary, licence), ""]
    if summary.recipe:
        lines += ["## Recipe", "", "| setting | value |", "|---|---|",
                  *[f"| {k} | {json.dumps(v)} |" for k, v in summary.recipe.items()], ""]
    lines += [*_results(info, summary), "", *_usage(info, repo_id), "", "## Files", "",
              "- `model.safetensors`: the backbone's weights (no head), "
              f"{'timm' if info.family == 'timm' else 'torchvision'} names;",
              "- `config.json`: timm's model config (when timm builds the same network) and a "
              "`moco` section: network, preprocessing, recipe and results;",
              "- `README.md`: this card, generated from the run.", ""]
    return "\n".join(lines)
