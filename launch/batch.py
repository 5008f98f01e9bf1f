"""Prompt batches: read a prompts file into jobs, name their outputs, know which are done, and why a run stopped.

Everything here runs before weights load: a bad line fails the run at once with its
line number. Output names come from the line index and a slug of the prompt, never
from a path in the prompt, so a prompt cannot write outside output_dir.
"""
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from k4flash.geometry import validate_request, validate_seed
from k4flash.output_paths import derived_path, media_path

JSONL_FIELDS = {"prompt", "seed", "time_length", "width", "height"}
SLUG_CHARS = 48


@dataclass(frozen=True)
class Job:
    index: int  # 0-based line index in the prompts file (0 in single-video mode)
    prompt: str
    seed: int
    time_length: int
    width: int
    height: int
    save_path: Path  # the .mp4 name; an image (time_length 0) is written as .png beside it

    @property
    def output_path(self) -> Path:
        return media_path(self.save_path, self.time_length)

    @property
    def sidecar_path(self) -> Path:
        return derived_path(self.output_path, ".json")

    def is_complete(self) -> bool:
        # The sidecar is written (atomically) after the video: both present = finished.
        return self.output_path.exists() and self.sidecar_path.exists()


class StorageStop(RuntimeError):
    """The outputs' filesystem refused a write (full, over quota, read-only): the run stopped there, every
    finished output kept and nothing half-written left; exit status 1 (README "When things go wrong")."""


def storage_stop_line(reason: str, jobs: list, batch: bool) -> str:
    """Rank 0's `error:` line for a run stopped by `reason` (`cannot write <path>: No space left on device`)."""
    if not batch:
        return f"{reason}; nothing half-written is left: free space and run it again"
    done = sum(job.is_complete() for job in jobs)
    return (f"{reason}; the batch stopped with {done} of {len(jobs)} prompt(s) done (kept; nothing half-written is "
            "left): free space and re-run the same command to resume")


def slugify(text: str) -> str:
    """'A red square!' → 'a-red-square' (ASCII letters and digits only, at most 48 chars)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:SLUG_CHARS].rstrip("-")
    return slug or "prompt"


def read_prompts_file(path, defaults: dict, output_dir) -> list:
    """Jobs from a text file (one prompt per line) or JSONL (.jsonl: prompt, seed, time_length, width, height).

    defaults: seed, time_length, width, height for fields a line does not give; a line's
    seed defaults to `seed + line index`, so every prompt gets its own reproducible noise.
    Blank lines are skipped but keep their index, so names stay stable when lines are added.
    """
    path, output_dir = Path(path), Path(output_dir)
    try:
        # "\n" only (and a CRLF's "\r"): str.splitlines() would also split a prompt at \x0b, \x1c,
        # \u2028 and others, shifting every later line number and output name.
        lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"prompts_file {path} cannot be read: {err}") from err
    jobs = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        fields = _parse_line(path, index, line) if path.suffix == ".jsonl" else {"prompt": line.strip()}
        request = {**defaults, "seed": defaults["seed"] + index, **fields}
        try:
            validate_request(request["prompt"], request["time_length"], request["height"], request["width"])
            validate_seed(request["seed"])
        except ValueError as err:
            raise ValueError(f"prompts_file {path} line {index + 1}: {err}") from None
        save_path = output_dir / f"{index:05d}-{slugify(request['prompt'])}.mp4"
        jobs.append(Job(index, save_path=save_path, **request))
    if not jobs:
        raise ValueError(f"prompts_file {path} has no prompts")
    return jobs


def _parse_line(path, index, line) -> dict:
    try:
        fields = json.loads(line)
    except ValueError as err:
        raise ValueError(f"prompts_file {path} line {index + 1}: not valid JSON ({err})") from None
    if not isinstance(fields, dict) or "prompt" not in fields:
        raise ValueError(f"prompts_file {path} line {index + 1}: expected a JSON object with a \"prompt\" key")
    unknown = sorted(set(fields) - JSONL_FIELDS)
    if unknown:
        raise ValueError(f"prompts_file {path} line {index + 1}: unknown key {unknown[0]!r}; "
                         f"allowed: {sorted(JSONL_FIELDS)}")
    return fields
