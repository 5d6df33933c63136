"""A backbone as a Hugging Face Hub model folder, and back.

:func:`save_for_hf` writes three files a Hub repository holds as is:

* ``model.safetensors``: the backbone's tensors (no head) under its network's own names
  (torchvision's for ResNets, which are timm's too; timm's for timm models);
* ``config.json``: for a network timm builds the same way (torchvision ResNets timm has under
  the same name, timm models, the MoCo v3 ViTs), timm's own model config at the top level
  (``architecture``, ``num_classes`` 0, ``num_features``, ``model_args``, ``pretrained_cfg``
  with the preprocessing), so that ``timm.create_model("local-dir:FOLDER", pretrained=True)``
  or ``"hf-hub:REPO"`` loads the folder; and a ``moco`` section (network, stem, feature width,
  preprocessing, method, epochs, pairs seen, recipe, the run's results);
* ``README.md``: the model card, written from the run (:mod:`moco.hub.card`).

:func:`from_pretrained` loads a folder (or a Hub repository through ``huggingface_hub``, the
``hub`` extra) back into the network, strictly, bit for bit; :func:`push_to_hub` uploads a
folder with ``huggingface_hub.upload_folder``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moco.core.errors import CheckpointError, HubError
from moco.data.recipes import eval_resize_size
from moco.hub.card import RunSummary, model_card, summarize_run
from moco.hub.networks import ModelInfo, build_network, finish, load_strict
from moco.hub.source import Exportable, exportable
from moco.utils.atomic import atomic_write_text

_log = logging.getLogger(__name__)

HF_FORMAT = "moco-hf/1"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
HUB_HINT = "pip install 'momentum-contrast[hub]' (or pip install huggingface_hub)"
_REPO_ID = re.compile(r"^(hf-hub:)?[\w.-]+/[\w.-]+(@[\w./-]+)?$")


@dataclass
class HfExport:
    """Where :func:`save_for_hf` wrote the folder and what it describes."""

    folder: Path
    info: ModelInfo
    summary: RunSummary
    num_tensors: int


def _timm_config(info: ModelInfo, model: nn.Module, licence: str) -> dict[str, Any]:
    """timm's ``config.json`` fields (``timm/models/_hub.py``'s layout) for ``info``."""
    size = info.image_size
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {}) if info.family == "timm" else {}
    pretrained_cfg = {
        "tag": "moco", "custom_load": False, "input_size": [3, size, size],
        "fixed_input_size": bool(pcfg.get("fixed_input_size", False)),
        "interpolation": "bilinear", "crop_pct": round(size / eval_resize_size(size), 4),
        "crop_mode": "center", "mean": list(info.mean), "std": list(info.std), "num_classes": 0,
        "first_conv": pcfg.get("first_conv", "conv1"), "classifier": pcfg.get("classifier", "fc"),
        "license": licence,
    }
    out: dict[str, Any] = {"architecture": info.arch, "num_classes": 0,
                           "num_features": info.feature_dim}
    if info.model_args:
        out["model_args"] = dict(info.model_args)
    out["pretrained_cfg"] = pretrained_cfg
    return out


def _moco_config(ex: Exportable, summary: RunSummary) -> dict[str, Any]:
    i = ex.info
    section: dict[str, Any] = {
        "format": HF_FORMAT, "weights": WEIGHTS, "family": i.family, "arch": i.arch,
        "model_args": dict(i.model_args), "cifar_stem": i.cifar_stem,
        "feature_dim": i.feature_dim, "image_size": i.image_size, "mean": list(i.mean),
        "std": list(i.std), "method": i.method,
        "epochs": summary.epoch if summary.epoch is not None else i.epochs,
        "pairs_seen": summary.pairs_seen, "data": summary.data, "recipe": summary.recipe,
        "results": [f.__dict__ for f in summary.figures],
        "source": {"file": ex.checkpoint.name if ex.checkpoint else i.source,
                   "layout": ex.layout},
    }
    if i.released is not None:
        w = i.released
        section["released"] = {"name": w.name, "url": w.url, "checksum": w.checksum_text,
                               "top1": w.top1, "top1_source": w.top1_source, "paper": w.paper,
                               "verified": w.verified}
    return section


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], info: ModelInfo) -> None:
    from moco.eval.export import write_safetensors

    write_safetensors(path, tensors, {"format": "pt", "moco_format": HF_FORMAT,
                                      "arch": info.arch, "family": info.family})


def save_for_hf(source: Any, out: str | Path, *, licence: str = "other",
                repo_id: str | None = None, lincls: list[str | Path] | None = None) -> HfExport:
    """Write the Hub model folder ``out`` for ``source``: a checkpoint file, a model from
    :func:`moco.load_pretrained` / :func:`from_pretrained`, or :func:`moco.load_backbone`'s
    ``(model, info)``. ``licence``: the card's licence id (``mit``, ``cc-by-nc-4.0`` for
    the authors' weights, ...; ``other`` when not said); ``repo_id``: named in the card's
    examples; ``lincls``: the ``moco lincls`` output folders to report (default: those of
    this checkpoint found in its run folder). Files already in ``out`` other than the three
    written here are left alone (a clone of a Hub repository)."""
    ex = exportable(source)
    info = ex.info
    if info.released is not None and licence == "other":
        licence = info.released.licence
    model = load_strict(build_network(info), ex.tensors, ex.checkpoint or "the model",
                        info.arch)  # what is written is exactly what loads
    summary = summarize_run(ex.checkpoint, ex.run_config, info.epochs,
                            None if lincls is None else [Path(p) for p in lincls])
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise HubError(f"{folder} is a file; the Hub format is a folder: choose a folder name")
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = _timm_config(info, model, licence) if info.timm_compatible else {}
    config["moco"] = _moco_config(ex, summary)
    _write_weights(folder / WEIGHTS, ex.tensors, info)
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    card = model_card(info, summary, licence=licence, repo_id=repo_id,
                      source=ex.checkpoint.name if ex.checkpoint else info.source)
    atomic_write_text(folder / CARD, card)
    return HfExport(folder, info, summary, len(ex.tensors))


def _hf() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(f"the Hugging Face Hub needs the huggingface_hub package: {HUB_HINT}; "
                       "a local folder loads without it") from None
    return huggingface_hub


def _download(repo: str, revision: str | None) -> Path:
    """The Hub repository ``repo`` in the local Hugging Face cache (downloaded when needed;
    ``HF_HUB_OFFLINE=1``: the cache only)."""
    hf = _hf()
    try:
        folder = hf.snapshot_download(repo, revision=revision,
                                      allow_patterns=[CONFIG, WEIGHTS, CARD])
    except (OSError, ValueError) as e:  # offline, not found, gated, a malformed id
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise HubError(f"cannot get {repo} from the Hugging Face Hub ({type(e).__name__}: "
                       f"{first}); check the name, log in for a private repository (hf auth "
                       "login), or pass a local folder") from None
    return Path(folder)


def resolve_folder(where: str | Path, revision: str | None = None) -> Path:
    """A local model folder, or the download of a Hub id ``owner/name`` (``hf-hub:`` and
    ``@revision`` accepted)."""
    p = Path(where).expanduser()
    if p.exists():
        if not p.is_dir():
            raise HubError(f"{p} is a file: pass the model folder (it holds {WEIGHTS}, {CONFIG})")
        return p
    text = str(where)
    if not _REPO_ID.match(text):
        raise HubError(f"{where} is neither a folder nor a Hugging Face Hub id (owner/name)")
    repo = text.removeprefix("hf-hub:")
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    return _download(repo, revision)


def read_config(folder: Path) -> dict[str, Any]:
    """The ``moco`` section of ``folder/config.json``; :class:`HubError` when it is not a
    folder written by :func:`save_for_hf`."""
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except OSError:
        raise HubError(f"{folder} has no {CONFIG}: not a model folder written by moco export "
                       "--format hf") from None
    except ValueError as e:
        raise HubError(f"{folder / CONFIG} is not valid JSON ({e})") from None
    section = cfg.get("moco") if isinstance(cfg, dict) else None
    if not isinstance(section, dict) or section.get("format") != HF_FORMAT:
        raise HubError(f"{folder / CONFIG} has no '{HF_FORMAT}' moco section: not written by moco "
                       "export --format hf (a timm model folder loads with timm.create_model("
                       "'local-dir:FOLDER'))")
    return section


def _info(section: dict[str, Any], where: str) -> ModelInfo:
    try:
        return ModelInfo(
            family=str(section["family"]), arch=str(section["arch"]),
            feature_dim=int(section["feature_dim"]), method=str(section.get("method", "MoCo")),
            model_args=dict(section.get("model_args") or {}),
            cifar_stem=bool(section.get("cifar_stem", False)),
            image_size=int(section["image_size"]),
            mean=tuple(float(x) for x in section["mean"]),
            std=tuple(float(x) for x in section["std"]),
            epochs=section.get("epochs"), source=where, config=section)
    except (KeyError, TypeError, ValueError) as e:
        raise HubError(f"{where}: config.json's moco section is incomplete ({e!r}); export the "
                       "folder again") from None


def from_pretrained(folder_or_repo_id: str | Path, num_classes: int | None = None, *,
                    device: str | torch.device = "cpu", revision: str | None = None) -> nn.Module:
    """The backbone of a model folder written by ``moco export --format hf`` (or a Hub
    repository holding one: ``owner/name``, needs ``huggingface_hub``).

    Returns the network in eval mode on ``device``: images [B,3,S,S] (``model.transform``
    makes them from PIL images) -> features [B, D], or logits [B, num_classes] with a fresh
    Linear head (N(0, 0.01), as ``main_lincls.py``). ``model.moco_info`` holds the folder's
    description (``config``: recipe and results). The weights load strictly: what was
    exported, bit for bit.
    """
    folder = resolve_folder(folder_or_repo_id, revision)
    info = _info(read_config(folder), str(folder_or_repo_id))
    weights = folder / WEIGHTS
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file (missing, truncated "
                              f"or corrupt): {e}") from None
    model = load_strict(build_network(info), tensors, weights, info.arch)
    return finish(model, info, num_classes, device)


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False,
                revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload the model folder to the Hub repository ``repo_id`` (created when missing) with
    ``huggingface_hub.upload_folder``; returns the commit's URL. The token is
    huggingface_hub's (``hf auth login`` or ``HF_TOKEN``)."""
    p = Path(folder)
    missing = [n for n in (WEIGHTS, CONFIG, CARD) if not (p / n).is_file()]
    if missing:
        raise HubError(f"{p} lacks {', '.join(missing)}: write the folder with moco export CKPT "
                       "--format hf --out FOLDER first")
    arch = read_config(p).get("arch")
    hf = _hf()
    message = commit_message or f"Upload a {arch} backbone pretrained with moco"
    try:
        hf.create_repo(repo_id, private=private, exist_ok=True)
        commit = hf.upload_folder(repo_id=repo_id, folder_path=str(p), revision=revision,
                                  commit_message=message)
    except (OSError, ValueError) as e:  # offline, not logged in, refused, a malformed id
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise HubError(f"cannot upload {p} to {repo_id} ({type(e).__name__}: {first}); log in "
                       "with hf auth login (or set HF_TOKEN) and check the repository name") from None
    return str(getattr(commit, "commit_url", commit))
