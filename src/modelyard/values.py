"""How a categorical value is written, the same in training data, the spec, requests and drift
bins: a column of integer codes, booleans or strings all become text one way.

`3`, `3.0` and `"3"` are `"3"`; `True` and `true` (JSON, YAML) are `"true"`. Plain Python: the
serving app imports this module, and the serving image carries no pandas.
"""

from __future__ import annotations

import math
from typing import Any


def category_text(value: Any) -> str:
    """The canonical text of a category value (callers handle missing values first)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))  # a code column read as float because it has gaps
    if hasattr(value, "item"):  # numpy scalars
        return category_text(value.item())
    return str(value)
