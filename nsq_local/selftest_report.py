"""nsq-selftest's report: what one check found (Check), and the report as it grows, with the versions it was made
with, written as JSON before each check and printed as a table at the end."""
from __future__ import annotations

import importlib.metadata
import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from nsq_local.ggml_ops import ggml_graph_api

PASS, FAIL, UNSUPPORTED, SKIPPED = "pass", "fail", "unsupported", "skipped"


@dataclass
class Check:
    """What one check found on one device: its status, a line for the table and its figures for the JSON."""

    device: str
    name: str
    status: str
    detail: str = ""
    figures: dict = field(default_factory=dict)


def versions() -> dict:
    import llama_cpp

    try:
        nsq_local = importlib.metadata.version("nsq-local")
    except importlib.metadata.PackageNotFoundError:
        nsq_local = "not installed (run from a checkout)"
    return {"nsq_local": nsq_local, "llama_cpp": llama_cpp.__version__,
            "ggml": ggml_graph_api().ggml_version().decode(), "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "system_info": llama_cpp.llama_print_system_info().decode().strip()}


class Report:
    """The report as it grows: written to its JSON file before each check (naming the check that is running)
    and at the end."""

    def __init__(self, path: Optional[Path], settings: dict):
        self.path = path
        self.data: dict = {"tool": "nsq-selftest", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "versions": versions(), "settings": settings, "devices": [], "checks": [],
                           "running": None}

    def running(self, what: Optional[str]) -> None:
        self.data["running"] = what
        self.write()

    def add(self, check: Check) -> None:
        self.data["checks"].append(asdict(check))

    def finish(self) -> None:
        counts = {s: sum(c["status"] == s for c in self.data["checks"]) for s in (PASS, FAIL, UNSUPPORTED, SKIPPED)}
        self.data["summary"] = counts
        self.data["ok"] = counts[FAIL] == 0
        self.data.pop("running")
        self.write()

    def write(self) -> None:
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2) + "\n")
            tmp.replace(self.path)

    def table(self) -> str:
        v = self.data["versions"]
        lines = [f"nsq-selftest: nsq-local {v['nsq_local']}, llama_cpp {v['llama_cpp']}, ggml {v['ggml']}, "
                 f"Python {v['python']}, {v['platform']}"]
        for d in self.data["devices"]:
            lines.append(f"device {d['name']}: {d['description']} ({d['type']}, {d['memory_total_mib']} MiB)")
        st = self.data["settings"]
        lines.append(f"model {st['model'] or 'none'}, {st['threads']} threads, KLD window -c {st['ctx_size']}, decode speed at depth "
                     f"{st['depth']} over {st['decode_tokens']} tokens")
        width = max([len(c["name"]) for c in self.data["checks"]] + [5])
        result = max([len(c["status"]) for c in self.data["checks"]] + [6])
        lines.append("")
        lines.append(f"{'device':<8} {'check':<{width}} {'result':<{result}} figures")
        for c in self.data["checks"]:
            lines.append(f"{c['device']:<8} {c['name']:<{width}} {c['status']:<{result}} {c['detail']}")
        s = self.data["summary"]
        lines.append("")
        lines.append(f"{s[PASS]} passed, {s[FAIL]} failed, {s[UNSUPPORTED]} not supported on their device (run on the "
                     f"CPU), {s[SKIPPED]} skipped")
        return "\n".join(lines)
