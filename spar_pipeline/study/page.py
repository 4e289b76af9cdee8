"""RUN/reports/index.html: one static page, opened from disk, that shows the whole study.

Only relative links, to files written next to it (figures/*.png, tables.md, tables.csv, summary.md
when the run wrote one); no script, no external style or font. Every text is HTML-escaped.
"""

from __future__ import annotations

import html
from typing import Sequence

from spar_pipeline.study.figures import Picture
from spar_pipeline.study.tables import Table

__all__ = ["render"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; } .notes { background: #fff8e1; padding: 0.6em 1em; border-left: 4px solid #f0b400; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } nav a { margin-right: 1em; }
"""


def render(title: str, facts: Sequence[tuple[str, str]], notes: Sequence[str], tables: Sequence[Table],
           pictures: Sequence[Picture], missing: Sequence[str], links: Sequence[tuple[str, str]]) -> str:
    """The page. ``facts``: (label, value) lines of the header; ``notes``: what is missing or odd;
    ``pictures``: figures written under figures/; ``missing``: figures not drawn and why;
    ``links``: (relative path, label) of files beside the page."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{_STYLE}</style></head><body>", f"<h1>{e(title)}</h1>", "<ul>"]
    out += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in facts]
    out.append("</ul>")
    if links:
        out.append("<nav>" + "".join(f'<a href="{e(path, quote=True)}">{e(label)}</a>' for path, label in links)
                   + "</nav>")
    if notes:
        out.append('<div class="notes">' + "".join(f"<p>{e(n)}</p>" for n in notes) + "</div>")
    if tables:
        out.append("<h2>Tables</h2><ul>" + "".join(f'<li><a href="#{e(t.slug, quote=True)}">{e(t.title)}</a></li>'
                                                  for t in tables) + "</ul>")
    for t in tables:
        out.append(f'<h3 id="{e(t.slug, quote=True)}">{e(t.title)}</h3>')
        out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr></thead><tbody>")
        out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows]
        out.append("</tbody></table>")
        if t.note:
            out.append(f'<p class="note">{e(t.note)}</p>')
    if pictures or missing:
        out.append("<h2>Figures</h2>")
    for p in pictures:
        src = e(f"figures/{p.name}", quote=True)
        out.append(f'<figure><h3>{e(p.title)}</h3><a href="{src}"><img src="{src}" alt="{e(p.title, quote=True)}">'
                   f"</a><figcaption>{e(p.caption)}</figcaption></figure>")
    if missing:
        out.append("<ul>" + "".join(f'<li class="note">{e(m)}</li>' for m in missing) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
