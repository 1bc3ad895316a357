"""The report's HTML page: one self-contained file (pictures inlined as data URIs, no scripts, no
fonts or styles fetched), readable offline and attachable anywhere."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from apostate import __version__
from apostate.search.pareto import count_text, kl_text, parameter_summary
from apostate.search.trial_record import TrialRecord

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
tr.chosen td { background: #fff6d5; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 0.6em; margin-bottom: 1.2em; }
.pair pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.6em; margin: 0; font-size: 0.85em; }
.prompt { font-weight: bold; margin: 0.8em 0 0.3em; } .note { color: #666; font-size: 0.9em; }
"""


def image(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{escape(alt)}" src="data:image/png;base64,{data}"></p>'


def table(
    headers: list[str], rows: list[list[str]], text_columns: set[int] = frozenset(), marked: int | None = None
) -> str:
    """An HTML table of already-formatted cells (escaped here); row `marked` highlighted."""

    def cell(tag: str, index: int, value: str) -> str:
        kind = ' class="text"' if index in text_columns else ""
        return f"<{tag}{kind}>{escape(str(value))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    marks = ['<tr class="chosen">' if number == marked else "<tr>" for number in range(len(rows))]
    body = "".join(
        mark + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>"
        for mark, row in zip(marks, rows, strict=True)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def front_table(data) -> str:
    has_judged = any(data.judged(t.number) for t in data.front)
    headers = ["Trial", "Refusals", "Broken", *(["Judged"] if has_judged else []), "KL divergence", "Parameters"]
    rows, marked = [], None
    chosen = data.chosen_trial
    for index, trial in enumerate(data.front):
        attrs = TrialRecord.of(trial)
        judged = data.judged(trial.number)
        row = [str(trial.number), f"{attrs.refusals}/{attrs.total}", str(attrs.broken)]
        if has_judged:
            row.append(count_text(judged) if judged else "-")
        row += [kl_text(attrs.kl), parameter_summary(attrs.parameters)]
        rows.append(row)
        if chosen is not None and trial.number == chosen.number:
            marked = index
    return table(headers, rows, {len(headers) - 1}, marked)


def samples_html(samples: list[dict]) -> str:
    parts = []
    for side in ("harmful", "harmless"):
        pairs = [s for s in samples if s["side"] == side]
        if not pairs:
            continue
        parts.append(f"<h3>{side.capitalize()} prompts</h3>")
        for pair in pairs:
            parts.append(f'<div class="prompt">{escape(pair["prompt"])}</div><div class="pair">')
            parts.append(f"<pre><b>Base model</b>\n{escape(pair['base'])}</pre>")
            parts.append(f"<pre><b>Chosen trial</b>\n{escape(pair['edited'])}</pre></div>")
    return "".join(parts)


def page(title: str, sections: list[tuple[str, str]], summary: str) -> str:
    body = "".join(f"<h2>{escape(heading)}</h2>{content}" for heading, content in sections if content)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>{STYLE}</style></head>
<body><h1>{escape(title)}</h1>{summary}{body}
<p class="note">Made by apostate {escape(__version__)}; rebuild with <code>apostate report RUN_DIR</code>.</p>
</body></html>
"""
