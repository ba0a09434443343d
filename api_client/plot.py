"""Pictures of per-token logprobs: a PNG (matplotlib) and a self-contained HTML page.

Tokens run along the x axis with their text; each token's bar reaches down to its
logprob (0 = certain). The HTML page is one file with an inline SVG and no
scripts or CDN: hovering a bar shows the token, its logprob and probability and
the top alternatives the job stored. Comparing jobs (the same text, several
models) draws their bars side by side when they share a tokenization, and
overlays them on a character axis when they do not.

Client side only: needs matplotlib for PNGs (``pip install 'logprobe[plot]'``),
nothing for HTML.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .results import Alternative, ProbeResult, TokenLogprob

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = ("png", "html")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")
GENERATED_COLOR = "#ff7f0e"
DPI = 100
HEIGHT = 420
#: Pixels per token column and for the margins, for the default width.
PX_PER_TOKEN = 44
PX_MARGIN = 140
MIN_WIDTH, MAX_WIDTH = 640, 6000


@dataclass(frozen=True)
class Bar:
    """One token drawn from ``x0`` to ``x1`` on the x axis."""

    x0: float
    x1: float
    token: TokenLogprob

    @property
    def center(self) -> float:
        return (self.x0 + self.x1) / 2


@dataclass(frozen=True)
class Series:
    """One job's sequence, laid out."""

    label: str
    job_id: str
    loss: float | None
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class Layout:
    series: tuple[Series, ...]
    ticks: tuple[tuple[float, str], ...]  # (x, raw token text) of the first series
    x_max: float
    x_unit: str  # "token" or "character"


def plot_tokens(result: ProbeResult, sequence: int = 0) -> tuple[TokenLogprob, ...]:
    """The tokens a plot shows: a generation's prompt, then its generated tokens."""
    if not result.sequences:
        raise ConfigError(f"job {result.job_id} has no sequences to plot")
    if not 0 <= sequence < len(result.sequences):
        raise ConfigError(f"job {result.job_id} has sequences 0..{len(result.sequences) - 1}, "
                          f"not {sequence}")
    seq = result.sequences[sequence]
    return (*seq.prompt_tokens, *seq.tokens)


def display_token(token: str) -> str:
    """A token as a label: visible leading/trailing spaces and escapes for control chars."""
    shown = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if shown.startswith(" "):
        shown = "␣" + shown[1:]
    return shown or "∅"


def layout(results: Sequence[ProbeResult], sequence: int = 0) -> Layout:
    """Place each result's tokens on a shared x axis."""
    if not results:
        raise ConfigError("nothing to plot: give at least one job")
    token_lists = [plot_tokens(r, sequence) for r in results]
    labels = [_label(r) for r in results]
    same_tokens = all([t.token for t in tokens] == [t.token for t in token_lists[0]]
                      for tokens in token_lists)
    series = []
    k = len(results)
    for i, (result, tokens) in enumerate(zip(results, token_lists, strict=True)):
        if same_tokens:  # grouped bars in one column per token
            width = 0.8 / k
            bars = tuple(Bar(j + 0.1 + i * width, j + 0.1 + (i + 1) * width, t)
                         for j, t in enumerate(tokens))
        else:  # each token spans its characters of the text
            bars = character_bars(result, tokens)
        series.append(Series(labels[i], result.job_id, result.loss, bars))
    first = token_lists[0]
    if same_tokens:
        ticks = tuple((j + 0.5, t.token) for j, t in enumerate(first))
        x_max = float(len(first))
    else:
        ticks = tuple((b.center, b.token.token) for b in series[0].bars)
        x_max = max((s.bars[-1].x1 + 0.05 for s in series if s.bars), default=1.0)
    return Layout(tuple(series), ticks, max(x_max, 1.0), "token" if same_tokens else "character")


def character_bars(result: ProbeResult, tokens: Sequence[TokenLogprob]) -> tuple[Bar, ...]:
    """Bars over the characters each token covers in the text.

    Tokens are found in order in the scored text (for a generation: in its tokens
    joined). A token that is not part of the text (a BOS token, half of a
    multi-byte character) gets a thin bar where it stands and moves nothing.
    """
    text = "".join(t.token for t in tokens)
    if result.kind == "score" and result.text:
        text = result.text
    bars, pos = [], 0
    for t in tokens:
        found = text.find(t.token, pos, pos + len(t.token) + 8) if t.token else -1
        if found < 0:
            bars.append(Bar(pos, pos + 0.3, t))
            continue
        end = found + len(t.token)
        bars.append(Bar(found + 0.05, end - 0.05, t))
        pos = end
    return tuple(bars)


def _label(result: ProbeResult) -> str:
    loss = "" if result.loss is None else f" (loss {result.loss:.4f})"
    return f"{Path(result.model).name or result.model}{loss}"


def default_size(lay: Layout) -> tuple[int, int]:
    """(width, height) in pixels: wide enough for every token label."""
    columns = len(lay.ticks)
    width = min(max(PX_MARGIN + PX_PER_TOKEN * columns, MIN_WIDTH), MAX_WIDTH)
    return width, HEIGHT


def _y_min(lay: Layout) -> float:
    values = [b.token.logprob for s in lay.series for b in s.bars if b.token.logprob is not None]
    return min(math.floor(min(values)) if values else -1.0, -1.0)


def _title(results: Sequence[ProbeResult]) -> str:
    if len(results) == 1:
        r = results[0]
        loss = "" if r.loss is None else f" · loss {r.loss:.4f}"
        return f"{r.model} · {r.kind} · job {r.job_id}{loss}"
    return f"the same text across {len(results)} models"


# --- PNG ------------------------------------------------------------------------


def figure(results: Sequence[ProbeResult], *, sequence: int = 0, width: int | None = None,
           height: int | None = None) -> Figure:
    """A matplotlib figure of the jobs' per-token logprobs (``width`` x ``height`` px)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError("PNG plots need matplotlib: pip install 'logprobe[plot]' "
                          "(or write an .html plot, which needs nothing)") from exc
    lay = layout(results, sequence)
    default_w, default_h = default_size(lay)
    width, height = width or default_w, height or default_h
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_subplot()
    for i, s in enumerate(lay.series):
        color = COLORS[i % len(COLORS)]
        drawn = [b for b in s.bars if b.token.logprob is not None]
        colors = [GENERATED_COLOR if len(lay.series) == 1 and b.token.generated else color
                  for b in drawn]
        ax.bar([b.x0 for b in drawn], [b.token.logprob for b in drawn],
               width=[b.x1 - b.x0 for b in drawn], align="edge", color=colors,
               alpha=0.55 if lay.x_unit == "character" and len(lay.series) > 1 else 0.9,
               edgecolor=color, linewidth=0.6, label=s.label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlim(0, lay.x_max)
    ax.set_ylim(_y_min(lay), 0.15)
    ax.set_xticks([x for x, _ in lay.ticks])
    ax.set_xticklabels([display_token(t) for _, t in lay.ticks], rotation=60, ha="right",
                       fontsize=8)
    ax.set_ylabel("logprob (natural log)")
    ax.set_title(_title(results), fontsize=10)
    if len(lay.series) > 1:
        ax.legend(fontsize=8, loc="best")
    fig.subplots_adjust(left=70 / width, right=1 - 20 / width, top=1 - 35 / height,
                        bottom=min(0.45, 110 / height))
    return fig


def write_png(results: Sequence[ProbeResult], path: str | Path, **options: Any) -> Path:
    fig = figure(results, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


# --- HTML -----------------------------------------------------------------------


def _tooltip(token: TokenLogprob, label: str) -> str:
    lines = [f"{label}", f"position {token.position} · token {token.token!r}"
             + ("" if token.token_id is None else f" (id {token.token_id})")]
    if token.logprob is None:
        lines.append("no logprob (nothing precedes this token)")
    else:
        lines.append(f"logprob {token.logprob:.4f} · p = {math.exp(token.logprob):.4g}")
    if token.generated:
        lines.append("generated")
    if token.top_logprobs:
        lines.append("top alternatives:")
        lines += [f"  {a.token!r}  {a.logprob:.4f}  (p = {math.exp(a.logprob):.3g})"
                  for a in token.top_logprobs]
    return "\n".join(lines)


def _alternatives(alts: Sequence[Alternative]) -> str:
    return ", ".join(f"{a.token!r} {a.logprob:.3f}" for a in alts)


def render_html(results: Sequence[ProbeResult], *, sequence: int = 0,
                width: int | None = None, height: int | None = None) -> str:
    """A self-contained HTML page (inline SVG, no scripts) of the jobs' logprobs."""
    lay = layout(results, sequence)
    default_w, default_h = default_size(lay)
    width, height = width or default_w, height or default_h
    left, right, top, bottom = 70, 20, 20, 110
    plot_w, plot_h = width - left - right, height - top - bottom
    y_min, y_max = _y_min(lay), 0.15

    def sx(x: float) -> float:
        return left + x / lay.x_max * plot_w

    def sy(y: float) -> float:
        return top + (y_max - y) / (y_max - y_min) * plot_h

    overlay = lay.x_unit == "character" and len(lay.series) > 1
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img">']
    for y in range(int(y_min), 1):
        svg.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" '
                   f'y2="{sy(y):.1f}"/><text class="ytick" x="{left - 6}" y="{sy(y) + 4:.1f}">'
                   f"{y}</text>")
    for i, s in enumerate(lay.series):
        color = COLORS[i % len(COLORS)]
        for b in s.bars:
            if b.token.logprob is None:
                continue
            fill = GENERATED_COLOR if len(lay.series) == 1 and b.token.generated else color
            y0, y1 = sy(0), sy(b.token.logprob)
            svg.append(
                f'<rect class="bar" x="{sx(b.x0):.1f}" y="{y0:.1f}" '
                f'width="{max(sx(b.x1) - sx(b.x0), 1):.1f}" height="{max(y1 - y0, 0.5):.1f}" '
                f'fill="{fill}" fill-opacity="{0.55 if overlay else 0.9}" stroke="{color}">'
                f"<title>{html.escape(_tooltip(b.token, s.label))}</title></rect>"
            )
    svg.append(f'<line class="axis" x1="{left}" x2="{left + plot_w}" y1="{sy(0):.1f}" '
               f'y2="{sy(0):.1f}"/>')
    for x, token in lay.ticks:
        tx, ty = sx(x), top + plot_h + 12
        svg.append(f'<text class="xtick" x="{tx:.1f}" y="{ty:.1f}" '
                   f'transform="rotate(-60 {tx:.1f} {ty:.1f})">'
                   f"{html.escape(display_token(token))}</text>")
    svg.append(f'<text class="ylabel" x="14" y="{top + plot_h / 2:.1f}" '
               f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">logprob</text></svg>')

    legend = "".join(
        f'<li><span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>'
        f"{html.escape(s.label)} · job <code>{html.escape(s.job_id)}</code></li>"
        for i, s in enumerate(lay.series)
    )
    tables = []
    for s in lay.series:
        rows = "".join(
            f"<tr><td>{b.token.position}</td>"
            f"<td>{'' if b.token.token_id is None else b.token.token_id}</td>"
            f'<td class="tok">{html.escape(b.token.token)}</td><td>'
            f"{'' if b.token.logprob is None else f'{b.token.logprob:.4f}'}</td><td>"
            f"{'yes' if b.token.generated else ''}</td>"
            f"<td>{html.escape(_alternatives(b.token.top_logprobs))}</td></tr>"
            for b in s.bars
        )
        tables.append(
            f"<details><summary>{html.escape(s.label)}: {len(s.bars)} tokens</summary>"
            "<table><tr><th>position</th><th>id</th><th>token</th><th>logprob</th>"
            f"<th>generated</th><th>top alternatives</th></tr>{rows}</table></details>"
        )
    title = html.escape(_title(results))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
svg text {{ font-size: 11px; font-family: ui-monospace, monospace; }}
.xtick {{ text-anchor: end; white-space: pre; }}
.ytick {{ text-anchor: end; }}
.grid {{ stroke: #e4e4e4; }} .axis {{ stroke: #000; }}
.bar:hover {{ fill-opacity: 1; stroke-width: 2; }}
.swatch {{ display: inline-block; width: 1em; height: 1em; margin-right: .4em;
           vertical-align: middle; }}
ul.legend {{ list-style: none; padding: 0; }}
table {{ border-collapse: collapse; font-size: 12px; margin: .5em 0 1em; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; }}
td.tok {{ white-space: pre; font-family: ui-monospace, monospace; }}
</style></head>
<body><h3>{title}</h3>
<p>Bars reach down to each token's logprob; hover a bar for its top alternatives.
x axis: {lay.x_unit}s.</p>
<ul class="legend">{legend}</ul>
{"".join(svg)}
{"".join(tables)}
</body></html>
"""


def write_html(results: Sequence[ProbeResult], path: str | Path, **options: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(results, **options), encoding="utf-8")
    return path


def write_plot(results: Sequence[ProbeResult], path: str | Path, *, format: str | None = None,
               **options: Any) -> Path:
    """Write a PNG or HTML plot; the format is given or taken from the file suffix."""
    format = format or Path(path).suffix.lower().lstrip(".") or "png"
    if format not in FORMATS:
        raise ConfigError(f"plot format {format!r} is not supported: use .png or .html")
    writer = write_png if format == "png" else write_html
    return writer(results, path, **options)
