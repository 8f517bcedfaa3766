"""Documentation of dataclass fields from the comments beside them, so a documented field documents the CLI
(`lorafuse train --help`, `lorafuse fuse --method NAME --help-options`) and the web UI's forms."""

from __future__ import annotations

import ast
import functools
import inspect
import io
import textwrap
import tokenize


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its documentation: the comment lines right above the field plus its trailing comment."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        trailing = (
            comments.get(node.end_lineno) if not lines[node.end_lineno - 1].lstrip().startswith("#") else None
        )
        docs[node.target.id] = " ".join([*above, *([trailing] if trailing else [])])
    return docs
