"""Writing the verdict JSON and the reports, each atomically, from one verdict dict."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llm_parity.report.document import render_verdict
from llm_parity.report.verdict import write_atomic


def write_outputs(data: Mapping[str, Any], json_path: Path | None,
                  report_paths: tuple[Path, ...] = ()) -> None:
    if json_path:
        write_atomic(json_path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for path in report_paths:
        write_atomic(path, render_verdict(dict(data), path.suffix, generated=generated))
