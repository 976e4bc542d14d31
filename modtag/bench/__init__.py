"""`modtag bench`: one module per program, each a separate run of `modtag bench`.

The workload is fixed so that runs compare: real photos (scikit-image's public-domain data), a caption
of exactly `CAPTION_TOKENS` greedy tokens, `PROBES` (yes/no questions) and `TEXTS` (image-text
matches) per image (`common.py`). The programs:

- `engine.py`: the engine against the stock tutorial way, at float32, the fast dtype and int8 (`run_bench`);
- `tags.py`: what tags and attribute checks cost (`--tags`, `run_tags_bench`);
- `through.py`: jobs/s through the embedded stack against the engine alone (`--through-stack`);
- `peers.py`: the vision stage through OpenVINO and ONNX Runtime (`--peers`);
- `report.py`: the reports as tables for people (`format_report`).
"""

from __future__ import annotations

from modtag.bench.common import BenchOptions
from modtag.bench.engine import count_flops, run_bench
from modtag.bench.report import format_report, format_tags_report
from modtag.bench.tags import run_tags_bench

__all__ = ["BenchOptions", "count_flops", "format_report", "format_tags_report", "run_bench", "run_tags_bench"]
