"""The reports of `gguforge eval`: terminal table, JSON, Markdown, and a plot (matplotlib, optional)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from ..errors import UserError
from .run import EvalResult
from .stats import printed_lines

COLUMNS = ("file", "type", "size", "bpw", "PPL", "mean KLD", "99.9% KLD", "same top p", "Δp RMS")


def _rows(result: EvalResult) -> list[tuple[str, ...]]:
    rows = []
    for c in sorted(result.candidates, key=lambda c: c["size_bytes"]):
        rows.append((Path(c["file"]).name, c["type"], f"{c['size_bytes'] / 1e6:,.2f} MB", f"{c['bpw']:.2f}",
                     f"{c['ppl_q']:.4f} ± {c['ppl_q_err']:.4f}", f"{c['kld_mean']:.6f} ± {c['kld_mean_err']:.6f}",
                     f"{c['kld_p99_9']:.6f}", f"{c['same_top_p']:.3f} ± {c['same_top_p_err']:.3f} %",
                     f"{c['dp_rms']:.3f} ± {c['dp_rms_err']:.3f} %"))
    return rows


def noise_floor(result: EvalResult) -> str | None:
    """With an HF base, the KLD of float GGUFs (F32/F16/BF16) among the candidates: conversion noise."""
    if "(HF" not in result.base:
        return None
    floats = [c for c in result.candidates if c["type"] in ("F32", "F16", "BF16")]
    if not floats:
        return None
    return "noise floor (float GGUF vs checkpoint): " + ", ".join(
        f"{c['type']} mean KLD {c['kld_mean']:.3g}, 99.9% {c['kld_p99_9']:.3g}" for c in floats)


def table(result: EvalResult) -> str:
    rows = [COLUMNS, *_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [f"base: {result.base}; {result.n_chunk} chunks of {result.n_ctx} tokens, {result.n_tokens} scored"]
    for k, r in enumerate(rows):
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    if floor := noise_floor(result):
        lines.append(floor)
    return "\n".join(lines)


def details(result: EvalResult) -> str:
    """Every statistic per candidate, as llama-perplexity prints them."""
    out = []
    for c, d in zip(result.candidates, result.details):
        out.append(f"== {c['file']}")
        out.extend(printed_lines(d))
    return "\n".join(out)


def to_json(result: EvalResult) -> bytes:
    return (json.dumps(sorted(result.candidates, key=lambda c: c["size_bytes"]), indent=2) + "\n").encode()


def to_markdown(result: EvalResult) -> bytes:
    head = ("| File | Type | Size | BPW | PPL | Mean KLD | 99.9% KLD | Same top p | Δp RMS |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join("| " + " | ".join(r) + " |\n" for r in _rows(result))
    note = (f"\nKL divergence from {result.base}, {result.n_chunk} chunks of {result.n_ctx} tokens "
            f"({result.n_tokens} scored tokens), statistics as llama-perplexity's.\n")
    return (head + body + note).encode()


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib", hint='pip install "gguforge[plot]"') from None


def to_png(result: EvalResult) -> bytes:
    """Mean and 99.9% KLD against bits per weight, one labelled point per file, log-scale KLD."""
    check_plot_available()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = sorted(result.candidates, key=lambda c: c["bpw"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    x = [c["bpw"] for c in cs]
    ax.plot(x, [max(c["kld_mean"], 1e-9) for c in cs], "o-", label="mean KLD")
    ax.plot(x, [max(c["kld_p99_9"], 1e-9) for c in cs], "s--", label="99.9% KLD")
    for c in cs:
        ax.annotate(c["type"], (c["bpw"], max(c["kld_mean"], 1e-9)), textcoords="offset points", xytext=(4, -12),
                    fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("KL divergence (nats)")
    ax.set_title(f"KLD vs {result.base}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_reports(result: EvalResult, json_path=None, markdown_path=None, plot_path=None, force: bool = False):
    """All report files at once, whole or not at all (format.writer.atomic_outputs)."""
    from ..format.atomic import replacing
    from ..format.writer import atomic_outputs
    outputs = [(p, f) for p, f in ((json_path, to_json), (markdown_path, to_markdown), (plot_path, to_png)) if p]
    if not outputs:
        return
    contents = [f(result) for _, f in outputs]
    with replacing(force), atomic_outputs([Path(p) for p, _ in outputs]) as files:
        for fh, data in zip(files, contents):
            fh.write(data)
