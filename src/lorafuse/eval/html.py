"""A self-contained HTML report: headings, paragraphs, pictures (PNG files beside the page) and tables."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from lorafuse.utils.atomic import atomic_write_text

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
img{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}code{background:#f4f4f4;padding:1px 4px}"""


class HtmlReport:
    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def image(self, relative_path: str, caption: str = "") -> None:
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img src="{html.escape(relative_path)}" alt="{html.escape(caption)}">{cap}</figure>')

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        def cell(v: object) -> str:
            return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def write(self, path: str | Path) -> Path:
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body>{''.join(self.parts)}</body></html>")
        atomic_write_text(path, page)
        return Path(path)
