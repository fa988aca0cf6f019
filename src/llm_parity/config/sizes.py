"""Sizes written as people write them (8GiB, 512MiB, 2G), for options such as
--memory-limit."""

from __future__ import annotations

from llm_parity.errors import SettingsError


def parse_size(value: str, flag: str = "--memory-limit") -> int:
    """`8GiB`, `512MiB`, `8G`, `8e9` or bytes."""
    text = str(value).strip().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "kb": 10**3,
             "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
             "b": 1, "": 1}
    import re

    match = re.fullmatch(r"([0-9.eE+-]+)([A-Za-z]*)", text)
    try:
        if match is None:
            raise ValueError(text)
        size = float(match.group(1)) * units[match.group(2).lower()]
    except (KeyError, ValueError):
        raise SettingsError(f"{flag}: expected a size such as 8GiB or 512MiB, got {value!r}") \
            from None
    if size <= 0:
        raise SettingsError(f"{flag}: expected a size above 0, got {value!r}")
    return int(size)
