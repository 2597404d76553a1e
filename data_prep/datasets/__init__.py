"""One annotation parser per dataset family; each returns a `ParsedSplit` of `VideoRecord`s."""
from __future__ import annotations

from typing import Callable

from data_prep.datasets import folder, kinetics, manifest, msrvtt, msvd, ssv1, ssv2, vatex
from data_prep.datasets.common import AnnotationError, ParseArgs
from data_prep.records import ParsedSplit

PARSERS: dict[str, Callable[[ParseArgs], ParsedSplit]] = {
    "kinetics400": kinetics.parse,
    "ssv2": ssv2.parse,
    "ssv1": ssv1.parse,
    "msrvtt": msrvtt.parse,
    "msvd": msvd.parse,
    "vatex": vatex.parse,
    "folder": folder.parse,
    "manifest": manifest.parse,
}
ALIASES = {"k400": "kinetics400", "kinetics": "kinetics400", "sthv2": "ssv2", "sthv1": "ssv1", "msr-vtt": "msrvtt"}


def parse_split(dataset: str, args: ParseArgs) -> ParsedSplit:
    """Parse one split of `dataset` (a name in PARSERS or ALIASES)."""
    name = ALIASES.get(dataset.lower(), dataset.lower())
    if name not in PARSERS:
        raise AnnotationError(f"unknown dataset {dataset!r}; use one of {sorted(PARSERS)}")
    return PARSERS[name](args)


__all__ = ["PARSERS", "ALIASES", "AnnotationError", "ParseArgs", "parse_split"]
