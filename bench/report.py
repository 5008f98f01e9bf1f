"""The one output format of every benchmark: a Markdown table on stdout, optional JSON and Markdown files.

A `Report` holds the run's metadata (torch version, CPU, threads, load average before
and after, accelerator name), one or more tables, and free-form notes. Timings on a
shared machine are only as good as its load, so the load average travels with every
figure.
"""
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def accelerator_name() -> str:
    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return "none"


def machine_metadata() -> dict:
    return {
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "accelerator": accelerator_name(),
        "loadavg_start": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def add_output_args(parser) -> None:
    parser.add_argument("--json", type=Path, help="also write the figures and metadata here (JSON)")
    parser.add_argument("--md", type=Path, help="also write the Markdown report here")


def _cell(value, fmt):
    if value is None:
        return "-"
    if callable(fmt):
        return fmt(value)
    return format(value, fmt) if fmt else str(value)


def table_lines(title: str, columns, rows) -> list:
    """A table in Markdown: its bold title, a blank line, the header, one line per row."""
    lines = [f"**{title}**" if title else "", "", "| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |" for row in rows]


class Report:
    def __init__(self, name: str, command=None, **settings):
        self.name = name
        self.command = command or " ".join(["python", "-m", f"bench.{name}", *sys.argv[1:]])
        self.settings = settings  # what was measured: config, dtype, repeats, ...
        self.metadata = machine_metadata()
        self.tables = []  # (title, columns [(key, header, fmt)], rows [dict])
        self.notes = []

    def table(self, title: str, columns, rows) -> None:
        """columns: (row key, header, format spec or callable); rows keep every key for the JSON."""
        self.tables.append((title, list(columns), list(rows)))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def markdown(self) -> str:
        meta = self.metadata
        load = " / ".join(f"{x:.1f}" for x in meta["loadavg_start"])
        load_end = " / ".join(f"{x:.1f}" for x in meta.get("loadavg_end", meta["loadavg_start"]))
        lines = [f"`{self.command}`", "",
                 f"torch {meta['torch']}, {meta['cpu']} ({meta['cpu_count']} cores, {meta['torch_threads']} torch "
                 f"threads), accelerator: {meta['accelerator']}; load average (1/5/15 min) {load} at start, "
                 f"{load_end} at end; {meta['date']}"]
        if self.settings:
            lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        for title, columns, rows in self.tables:
            lines += ["", *table_lines(title, columns, rows)]
        if self.notes:
            lines += [""] + [f"- {text}" for text in self.notes]
        return "\n".join(line for line in lines) + "\n"

    def to_dict(self) -> dict:
        return {"name": self.name, "command": self.command, "settings": self.settings, "metadata": self.metadata,
                "tables": [{"title": t, "columns": [c[0] for c in cols], "rows": rows} for t, cols, rows in self.tables],
                "notes": self.notes}

    def write(self, json_path=None, md_path=None) -> dict:
        """Write the files asked for, each whole or not at all (a run killed mid-write leaves the previous one);
        returns the JSON-able dict."""
        self.metadata["loadavg_end"] = list(os.getloadavg())
        data = self.to_dict()
        for path, text in ((json_path, lambda: json.dumps(data, indent=2, default=str) + "\n"),
                           (md_path, self.markdown)):
            if path:
                partial = Path(f"{path}.partial")
                partial.write_text(text())
                os.replace(partial, path)
        return data

    def emit(self, json_path=None, md_path=None) -> dict:
        """Print the Markdown, write the files asked for; returns the JSON-able dict."""
        data = self.write(json_path, md_path)
        print(self.markdown(), end="")
        return data
