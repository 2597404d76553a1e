"""Every experiment key with its default and comment, read off the config dataclasses (`s4v train --help`).

The comments are the ones next to each field in the source (s4v/experiment.py, s4v/data/config.py),
so the help can never disagree with the code.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line in the class source ('' where none)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    for line in lines:
        m = _FIELD.match(line)
        if m and m.group(1) not in out:
            out[m.group(1)] = (m.group(2) or "").strip()
    return out


def _sections(cfg) -> list[tuple[str, object]]:
    return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if dataclasses.is_dataclass(getattr(cfg, f.name))]


def describe_config(cfg) -> str:
    """Text listing: top-level keys, then one block per section with `key = default  # comment`."""
    hints = typing.get_type_hints(type(cfg))
    top = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
           if not dataclasses.is_dataclass(getattr(cfg, f.name))]
    out, comments = [], field_comments(type(cfg))
    for name, value in top:
        note = comments.get(name) or _type(hints[name])
        out.append(f"{name} = {value!r}  # {note}")
    for section, obj in _sections(cfg):
        doc = (type(obj).__doc__ or "").strip().splitlines()
        title = doc[0] if doc and not doc[0].startswith(type(obj).__name__ + "(") else ""
        out.append(f"\n{section}:" + (f"  # {title}" if title else ""))
        comments = field_comments(type(obj))
        for f in dataclasses.fields(obj):
            note = comments.get(f.name, "")
            out.append(f"  {section}.{f.name} = {getattr(obj, f.name)!r}" + (f"  # {note}" if note else ""))
    return "\n".join(out)


def _type(tp) -> str:
    args = typing.get_args(tp)
    return " | ".join(map(repr, args)) if typing.get_origin(tp) is typing.Literal else getattr(tp, "__name__", str(tp))
