"""report.md of ``scripts/gpu_check.py``: one page from results.json (whatever sections exist)."""

from __future__ import annotations

from typing import Any

from gpu_check_parts import THROUGHPUT_TARGET


def _f(v: Any, spec: str = ".0f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _head(results: dict[str, Any]) -> list[str]:
    secs = results["sections"]
    m = secs["machine"]["data"].get("info", {})
    pack = secs["machine"]["data"].get("pack", {})
    lines = [f"# gpu-check{' (DRY RUN: CPU, tiny sizes)' if results['dry_run'] else ''}, "
             f"{results['started']}, {results['seconds'] / 60:.1f} min", ""]
    if m:
        gpu = (f"**{m['gpu']}** (capability {m['capability']}, {m['gpu_memory_gib']} GiB), driver "
               f"{m['driver']}, CUDA {m['cuda_runtime']}, cuDNN {m['cudnn']}; " if "gpu" in m
               else f"**{m['device']}** (no GPU); ")
        lines.append(f"{gpu}torch {m['torch']}, torchvision {m['torchvision']}, Python "
                     f"{m['python']}; precision **{m['precision']}** (`--precision auto`); "
                     f"{m['machine']}")
    if pack:
        lines.append(f"gpu-pack/: {pack['images']} JPEGs, {pack['mib']} MiB" if pack.get("found")
                     else f"gpu-pack/: NOT FOUND; make it with `{pack['make_it'].split('#')[0].strip()}`")
    lines += ["", "| section | status | s / budget |", "|---|---|---|"]
    for s in secs.values():
        inj = f" ({s['injected']} injected)" if s["injected"] else ""
        err = f": {s['error'].splitlines()[0][:90]}" if s["error"] else ""
        lines.append(f"| {s['name']} | {s['status']}{inj}{err} | {s['seconds']:.0f} / {s['budget']:.0f} |")
    return lines


def _tier(name: str, d: dict[str, Any]) -> list[str]:
    if "counts" not in d:
        return []
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(d["counts"].items()))
    lines = ["", f"## {name}: {counts or 'nothing ran'} ({d['runs']} pytest run(s), exit {d['returncode']})"]
    lines += [f"- {o}: `{t}`" for t, o in list(d["problems"].items())[:12]]
    if d.get("slowest"):
        lines.append("slowest: " + "; ".join(f"{s:.0f} s {t.split('::')[-1]}" for s, _, t in d["slowest"][:5]))
    return lines


def _throughput(d: dict[str, Any]) -> list[str]:
    rows = d.get("rows") or []
    if not rows:
        return []
    lines = ["", "## Throughput (pairs/s)", "",
             "| setup | end to end | model only | e2e/model | plain step | GPU peak MiB | loader, precision |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['setup']} | {r['status']}: {r.get('why') or r.get('error', '')[:80]} |||||||")
            continue
        lines.append(f"| {r['setup']} | {_f(r.get('end_to_end'))} | {_f(r.get('model_only'))} | "
                     f"{_f(r.get('ratio'), '.2f')} | {_f(r.get('plain_model_only'))} | "
                     f"{_f(r.get('cuda_peak_mib'))} | {r['loader']}, {r['precision']} |")
    r18 = rows[0]
    if r18.get("status") == "ok" and r18.get("device", "").startswith("cuda"):
        lines.append(f"\nTargets: R18 end to end >= {THROUGHPUT_TARGET} pairs/s: "
                     f"{'met' if r18['end_to_end'] >= THROUGHPUT_TARGET else 'NOT met'}; "
                     f"e2e/model >= 0.9: {'met' if r18['ratio'] >= 0.9 else 'NOT met'}")
    return lines


def _decode(d: dict[str, Any]) -> list[str]:
    if "4:2:0" not in d:
        return []
    cells = "; ".join(f"{k}: mean {d[k]['mean']}, max {d[k]['max']} levels over {d[k]['files']} "
                      f"files ({d[k]['fell_back']} fell back to the CPU)" for k in ("4:2:0", "4:4:4"))
    return ["", f"## nvJPEG vs libjpeg ({d['device']}): {cells}"]


def _learning(d: dict[str, Any]) -> list[str]:
    if "epochs" not in d:
        return []
    lines = ["", f"## Learning: `moco pretrain --preset cifar10`, --time-limit {d.get('time_limit_min')} "
             f"min: {d['verdict']}", "", "| epoch | pairs seen | kNN ours | authors | diff |",
             "|---:|---:|---:|---:|---:|"]
    for r in d["epochs"][:12]:
        lines.append(f"| {r['epoch']} | {r['pairs']} | {_f(r['knn_top1'], '.2f')} | "
                     f"{_f(r['authors'], '.2f')} | {_f(r['diff'], '+.2f')} |")
    return lines


def render(results: dict[str, Any]) -> str:
    secs = results["sections"]
    lines = _head(results)
    lines += _tier("CUDA tier", secs["tests"]["data"])
    lines += _throughput(secs["throughput"]["data"])
    lines += _decode(secs["decode"]["data"])
    lines += _learning(secs["learning"]["data"])
    lines += _tier("--compile test", secs["compile"]["data"])
    return "\n".join(lines) + "\n"
