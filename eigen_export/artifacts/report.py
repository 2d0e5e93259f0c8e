"""report/: report.json (every number), report.md and PNG plots rendered from it: what a person reads in a
minute, verdict first (DESIGN 8)."""
from __future__ import annotations

import json
from pathlib import Path

from .layout import REPORT_JSON, REPORT_MD
from .records import atomic_dir, check_format, read_json_record

REPORT_FORMAT = "eigen_export.report"
REPORT_VERSION = 1
REMAKE = "re-run `eigen-export validate --force`"
LATENCY_PNG = "latency_vs_context.png"
SWEEP_PNG = "perplexity_vs_kv_ratio.png"


def read_report(report_dir: str | Path) -> dict:
    path = Path(report_dir) / REPORT_JSON
    report = read_json_record(path, "run `eigen-export validate`", REMAKE)
    return check_format(report, path, REPORT_FORMAT, REPORT_VERSION, REMAKE)


def report_owner(report_dir: str | Path) -> dict | None:
    """(the folded weights' sha256 and model name) of the report already in report_dir, None if there is none."""
    path = Path(report_dir) / REPORT_JSON
    if not path.exists():
        return None
    old = read_json_record(path, "", "pass --force to replace it")
    return {"folded_sha256": old.get("folded_sha256"), "model": old.get("model", "unknown")}


def write_report(out: Path, report: dict) -> dict:
    """report.md and the plots, then report.json (last: marks completion), replacing `out` atomically; returns
    the record as written."""
    report = {"format": REPORT_FORMAT, "version": REPORT_VERSION, **report}
    with atomic_dir(out, force=True) as tmp:
        plots = render_plots(report, tmp)
        (tmp / REPORT_MD).write_text(render_markdown(report, plots))
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=1) + "\n")
    return report


def table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; every row has the header's column count (cells are formatted by `cell`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row} has {len(row)} cells for {len(header)} columns")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}" if abs(value) < 10 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def _engines(report: dict) -> tuple[str, str]:
    backend = report["engine"]["backend"]
    return f"{backend} original", f"{backend} compressed"


def trade(report: dict) -> str:
    """The deployment trade in one clause: bytes and decode time saved against accuracy lost at the served
    context (decode time: compressed engine / uncompressed engine at the largest batch and context timed)."""
    mem, acc, settings = report["memory"], report["accuracy"], report["settings"]
    long, cont = acc["long_context"], acc["continuations"]
    bytes_ratio = mem["kv_bytes_per_token_compressed"] / mem["kv_bytes_per_token_original"]
    ppl = long["perplexity_folded"] / long["perplexity_original"] - 1
    batch, context = settings["latency_batches"][-1], settings["latency_contexts"][-1]
    original, compressed = (_latency(report, name, batch, context, "decode_ms") for name in _engines(report))
    speed = f"{compressed / original:.2f}x decode time at batch {batch} / {context}, " if original and compressed \
        else ""
    return (f"{bytes_ratio:.2f}x KV bytes, {speed}{ppl:+.1%} perplexity at {long['seqlen']} tokens, greedy "
            f"continuations agree for {cont['mean_matching_prefix']:.1f} of {cont['tokens']} tokens")


def verdict_line(report: dict) -> str:
    checks = report["checks"]
    failed = [c for c in checks if not c["passed"]]
    skipped = report["skipped"]
    tail = f"; {len(skipped)} backend(s) skipped, see below" if skipped else ""
    if not failed:
        return f"{trade(report)}: **PASS** (all {len(checks)} checks passed{tail})."
    worst = "; ".join(f"{c['layer']} / {c['name']} = {cell(c['value'])} (limit {c['op']} {cell(c['limit'])})"
                      for c in failed[:3])
    more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
    return f"{trade(report)}: **FAIL** ({len(failed)} of {len(checks)} checks failed: {worst}{more}{tail})."


def _latency(report: dict, backend: str, batch: int, context: int, phase: str) -> float | None:
    for row in report["latency"]:
        if (row["backend"], row["batch"], row["context"]) == (backend, batch, context):
            return row[phase]["p50"]
    return None


def _summary(report: dict) -> str:
    acc, mem, settings = report["accuracy"], report["memory"], report["settings"]

    def versus(orig, comp):
        return [orig, f"{cell(comp)} ({comp / orig:.2f}x)" if orig else cell(comp)]

    long, cont = acc["long_context"], acc["continuations"]
    rows = [[f"KV cache bytes per token ({mem['kv_dtype']})",
             *versus(mem["kv_bytes_per_token_original"], mem["kv_bytes_per_token_compressed"])],
            [f"{settings['dataset']} test perplexity ({acc['windows']} x {acc['seqlen']})",
             *versus(acc["perplexity_original"], acc["perplexity_folded"])],
            [f"{settings['dataset']} test perplexity ({long['windows']} x {long['seqlen']}, the engine's context)",
             *versus(long["perplexity_original"], long["perplexity_folded"])],
            [f"next-token accuracy ({acc['windows']} x {acc['seqlen']})", acc["top1_accuracy_original"],
             acc["top1_accuracy_folded"]],
            [f"greedy continuation agreed with the original (mean of {cont['prompts']} prompts)",
             f"{cont['tokens']} tokens", cont["mean_matching_prefix"]]]
    backend = report["engine"]["backend"]
    engine_original, engine_compressed = _engines(report)
    for batch in settings["latency_batches"]:
        for context in settings["latency_contexts"]:
            orig = _latency(report, engine_original, batch, context, "decode_ms")
            comp = _latency(report, engine_compressed, batch, context, "decode_ms")
            if comp is None:
                continue
            where = f"batch {batch}, context {context} (p50)"
            rows.append([f"{backend} engine decode ms/token, {where}",
                         *(versus(orig, comp) if orig else ["not built", comp])])
            rows.append([f"{backend} engine tokens/s, {where}", *(versus(_rate(batch, orig), _rate(batch, comp))
                                                                if orig else ["not built", _rate(batch, comp)])])
            prefill = [_latency(report, name, batch, context, "prefill_ms") for name in _engines(report)]
            rows.append([f"{backend} engine prefill ms, {where}",
                         *(versus(*prefill) if prefill[0] else ["not built", prefill[1]])])
    batch, context = settings["latency_batches"][-1], settings["latency_contexts"][-1]
    rows.append([f"PyTorch decode ms/token, batch {batch}, context {context} (p50)",
                 *versus(_latency(report, "pytorch original", batch, context, "decode_ms"),
                         _latency(report, "pytorch compressed", batch, context, "decode_ms"))])
    sizes = report["sizes_bytes"]
    rows.append(["engine size (bytes)", *(versus(sizes["baseline_engine"], sizes["engine"])
                                         if sizes.get("baseline_engine") else ["not built", sizes["engine"]])])
    return table(["", "original", "compressed"], rows)


def _rate(batch: int, ms: float | None) -> float | None:
    """Tokens per second of a decode step over the whole batch."""
    return batch * 1000.0 / ms if ms else None


def render_markdown(report: dict, plots: list[str]) -> str:
    comp, acc = report["compression"], report["accuracy"]
    parts = [f"# Parity report: {report['model']}", verdict_line(report),
             f"KV ratio {comp['kv_ratio']:.3f} (rope mode {comp['rope_mode'] or 'n/a'}), engine backend "
             f"`{report['engine']['backend']}`, measured on {report['machine'].get('gpu') or report['machine']['cpu']} "
             f"({report['device']}), {report['created']}, commit `{report['git_commit'][:10]}`."
             + (f" {report['engine']['note']}" if report["engine"].get("note") else "")
             + (f" Baseline engine: {report['engine']['baseline_note']}." if report["engine"].get("baseline_note")
                else ""),
             _summary(report),
             "## Checks",
             table(["layer", "check", "value", "limit", "result"],
                   [[c["layer"], c["name"], c["value"], f"{c['op']} {cell(c['limit'])}",
                     "pass" if c["passed"] else "**FAIL**"] for c in report["checks"]])]
    if report["skipped"]:
        parts += ["Not run here (not counted as passed):",
                  "\n".join(f"- {name}: {reason}" for name, reason in report["skipped"].items())]
    parts += ["## Accuracy: folded vs original (PyTorch)",
              f"Top-1 agreement {acc['top1_agreement']:.4f}, KL {acc['kl']:.4f} nats per token over "
              f"{acc['windows']} x {acc['seqlen']} tokens. Layer output errors on the first window:",
              table(["layer", "r_k", "r_v", "relative output error"],
                    [[i, rk, rv, err] for i, ((rk, rv), err) in enumerate(zip(comp["ranks"], acc["layer_errors"]))])]
    if report["sweep"]:
        parts += ["Perplexity at other KV ratios (folded in memory from the same calibration):",
                  table(["target", "KV ratio", "perplexity"],
                        [[p["target"], p["kv_ratio"], p["perplexity"]] for p in report["sweep"]])]
    if report["backends"]:
        rows = []
        for name, n in report["backends"].items():
            p, d = n["prefill"], n["decode"]
            rows.append([name, p["max_abs"], p["mean_abs"], p["cosine"], p["top1"], p["kl"], d["max_abs"],
                         n["present_max_abs"], n["greedy_match"]])
        parts += ["## Backend parity: backend vs folded PyTorch",
                  f"Batch of 3 left-padded prompts ({', '.join(map(str, next(iter(report['backends'].values()))['prompt_lengths']))} "
                  "tokens); logits compared at real positions, then one decode step and greedy generation.",
                  table(["backend", "prefill max abs", "mean abs", "min cosine", "top-1", "KL", "decode max abs",
                         "present max abs", "greedy match"], rows)]
    parts += ["## Performance",
              "Milliseconds, p50 / p90 over repeats after warm-up. Decode steps end at the given context. "
              "Compare rows of one report, not across reports (machines are shared). The original model is "
              "timed in PyTorch only: only the compressed model is exported.",
              table(["backend", "batch", "context", "prefill p50", "prefill p90", "decode p50", "decode p90"],
                    [[r["backend"], r["batch"], r["context"], r["prefill_ms"]["p50"], r["prefill_ms"]["p90"],
                      r["decode_ms"]["p50"], r["decode_ms"]["p90"]] for r in report["latency"]])]
    mem, sizes = report["memory"], report["sizes_bytes"]
    parts += ["## Sizes and memory",
              table(["item", "value"],
                    [["folded model (MB)", sizes["folded"] / 2**20], ["ONNX export (MB)", sizes["onnx"] / 2**20],
                     [f"engine, {report['engine']['backend']} (MB)", sizes["engine"] / 2**20],
                     ["peak RSS of the validate run (MB)", mem["peak_rss_mb"]]]
                    + ([["peak CUDA memory (MB)", mem["peak_cuda_mb"]]] if "peak_cuda_mb" in mem else []))]
    parts += [f"![{name}]({name})" for name in plots]
    parts += ["## Settings and versions",
              table(["setting", "value"], [[k, ", ".join(map(str, v)) or "none" if isinstance(v, (list, tuple)) else v]
                                           for k, v in report["settings"].items()]),
              table(["package", "version"], [[k, v or "not installed"] for k, v in report["versions"].items()]),
              "Validation took " + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items()) + "."]
    return "\n\n".join(parts) + "\n"


def render_plots(report: dict, out_dir: Path) -> list[str]:
    """Write the PNGs into out_dir; return their file names. Needs matplotlib (the `report` extra)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    batches = report["settings"]["latency_batches"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for backend in dict.fromkeys(r["backend"] for r in report["latency"]):
            rows = sorted((r["context"], r["decode_ms"]["p50"]) for r in report["latency"]
                          if r["backend"] == backend and r["batch"] == batch)
            ax.plot(*zip(*rows), marker="o", label=backend)
        ax.set(title=f"decode, batch {batch}", xlabel="context (tokens)", ylabel="ms per token (p50)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / LATENCY_PNG, dpi=110)
    plt.close(fig)
    written.append(LATENCY_PNG)
    if report["sweep"]:
        acc = report["accuracy"]
        points = sorted([(p["kv_ratio"], p["perplexity"]) for p in report["sweep"]]
                        + [(acc["kv_ratio"], acc["perplexity_folded"])])
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(*zip(*points), marker="o", label="compressed")
        ax.scatter([acc["kv_ratio"]], [acc["perplexity_folded"]], color="C3", zorder=3, label="this build")
        ax.axhline(acc["perplexity_original"], color="gray", linestyle="--", label="original")
        ax.set(xlabel="KV cache ratio", ylabel="perplexity", title=report["model"])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / SWEEP_PNG, dpi=110)
        plt.close(fig)
        written.append(SWEEP_PNG)
    return written
