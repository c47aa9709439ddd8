"""The report as blocks (headings, text, tables, images) and their Markdown and HTML renderings."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass

from phalanx.eval.tables import markdown_table

@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Text:
    text: str
    missing: bool = False  # rendered as a call-out: something was skipped


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""
    footnotes: Sequence[str] = ()
    bold_row: str | None = "mixture"  # first-cell value of rows shown in bold


@dataclass(frozen=True)
class Image:
    relpath: str
    png: bytes
    caption: str


Block = Heading | Text | Table | Image


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + block.text)
        elif isinstance(block, Text):
            out.append(f"> **{block.text}**" if block.missing else block.text)
        elif isinstance(block, Table):
            rows = [[f"**{r[0]}**", *r[1:]] if block.bold_row and r[0] == block.bold_row else list(r)
                    for r in block.rows]
            out.append(markdown_table(block.header, [[_md_cell(c) for c in r] for r in rows]))
            if block.caption:
                out.append(f"*{block.caption}*")
            if block.footnotes:
                out.append("\n".join(f"- {_md_cell(f)}" for f in block.footnotes))
        elif isinstance(block, Image):
            out.append(f"![{Path(block.relpath).stem}]({block.relpath})\n\n*{block.caption}*")
    return "\n\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1, h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0 .3em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #bbb; padding: .3em .7em; text-align: right; }
th { background: #eee; }
td:first-child, th:first-child { text-align: left; }
tr.bold td { font-weight: bold; background: #f5f5f5; }
.caption, figcaption { color: #444; font-size: .9em; font-style: italic; }
.missing { background: #fff6e0; border-left: 4px solid #c90; padding: .4em .8em; }
.footnotes { font-size: .9em; margin-top: .2em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            cls = ' class="missing"' if block.missing else ""
            out.append(f"<p{cls}>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            out.append("<table>")
            out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.header) + "</tr>")
            for row in block.rows:
                cls = ' class="bold"' if block.bold_row and row[0] == block.bold_row else ""
                out.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
            out.append("</table>")
            if block.caption:
                out.append(f'<p class="caption">{esc(block.caption)}</p>')
            if block.footnotes:
                out.append('<ul class="footnotes">' + "".join(f"<li>{esc(f)}</li>" for f in block.footnotes)
                           + "</ul>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode("ascii")
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.caption)}">'
                       f"<figcaption>{esc(block.caption)}</figcaption></figure>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
