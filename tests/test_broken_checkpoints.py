"""A truncated or corrupt DiT checkpoint: one `error:` line naming the file and what is wrong, exit status 2,
nothing written, before any rank builds the DiT or joins a process group (k4flash/checkpoint_check.py).

Each break is made on a copy of the tiny weights: their .safetensors copy (which the loader prefers) cut inside
its 8-byte length, inside its JSON header, in the middle of the data, 3 bytes into the last tensor, or with a
header that puts a tensor past the end; the .pt (alone) cut inside its first zip record's header, in the middle,
3 bytes short. One rank: every break, in-process through the CLI's `run`. Two ranks under launch.torchrun (tp=2
for the safetensors file): two breaks, each rank recording whether it built a DiT or joined a process group.
"""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import k4flash.dit
import k4flash.pipeline
import parallel.runtime
from k4flash.checkpoint_check import CheckpointError, check_checkpoint_file, check_dit_checkpoint
from k4flash.published import DIT_FILENAME
from k4flash.tiny import TINY_DIT_PARAMS
from k4flash.weights import load_dit, read_checkpoint
from test_bad_input import run_cli

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "run_inference_distil.py"
PT, ST = DIT_FILENAME, Path(DIT_FILENAME).with_suffix(".safetensors").name
FP8 = Path(DIT_FILENAME).with_suffix(".fp8.safetensors").name
RUN = ["model=tiny", "model.builtin=false", "download=false", "weights_dir=weights", "time_length=0", "width=512",
       "height=512", "progress=false", "save_path=out/v.mp4"]


def _header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def _past_the_end(data: bytes) -> bytes:
    """The same file, but the header moves its last tensor 4096 bytes past the end of the data (same header size)."""
    length = _header_length(data)
    header = json.loads(data[8:8 + length])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"] = [n + 4096 for n in header[last]["data_offsets"]]
    text = json.dumps(header, separators=(",", ":")).encode()
    return data[:8] + text.ljust(length) + data[8 + length:]


NAME = r"'[\w.]+'"
# case: (the file broken, how, the message after "cannot read DiT checkpoint <path>: ", a regular expression)
CASES = {
    "st_inside_length": (ST, lambda b: b[:5], re.escape(
        "the file is truncated: it has 5 byte(s), fewer than the 8-byte header length a .safetensors file starts "
        "with")),
    "st_inside_json": (ST, lambda b: b[:8 + _header_length(b) // 2],
                       r"the file is truncated: its header length says a (\d+)-byte JSON header follows, the file "
                       r"has \d+ byte\(s\) after it"),
    "st_mid_data": (ST, lambda b: b[:len(b) // 2], r"the file is truncated: its header says \d+ bytes of tensor data, "
                    rf"the file has \d+ \(\d+ missing, from tensor {NAME} on\)"),
    "st_last_tensor": (ST, lambda b: b[:-3], r"the file is truncated: its header says \d+ bytes of tensor data, the "
                       rf"file has \d+ \(3 missing, from tensor {NAME} on\)"),
    "st_offset_past_end": (ST, _past_the_end, rf"its header is corrupt: tensor {NAME} lies at bytes \d+\.\.\d+ of the "
                           r"tensor data, past its end \(\d+ bytes\)"),
    "pt_inside_first_header": (PT, lambda b: b[:20], re.escape(
        "the file is truncated: it has 20 byte(s), less than one zip record's header")),
    "pt_middle": (PT, lambda b: b[:len(b) // 2], r"the file is truncated: it has \d+ bytes of a torch.save zip "
                  r"archive and ends before the directory of records that closes it"),
    "pt_last_bytes": (PT, lambda b: b[:-3], r"the file is truncated: it has \d+ bytes of a torch.save zip archive "
                      r"and ends inside the directory of records that closes it \(its end-of-archive record is "
                      r"missing\)"),
}


@pytest.fixture(scope="module")
def tiny_safetensors(tiny_weights, tmp_path_factory):
    """The tiny DiT's .safetensors copy, as `python -m parallel.convert` writes it."""
    from parallel.convert import convert
    return convert(tiny_weights / PT, tmp_path_factory.mktemp("st") / ST)


def break_weights(folder: Path, case: str, tiny_safetensors: Path) -> Path:
    """Apply `case` to the weights `folder` (its DiT .pt; a .safetensors copy beside it for the st_ cases)."""
    name, damage, _ = CASES[case]
    if name == ST:
        shutil.copy(tiny_safetensors, folder / ST)
    path = folder / name
    path.write_bytes(damage(path.read_bytes()))
    return path


def expected_message(path, case) -> str:
    """A regular expression for the CheckpointError's message; `error: ` and it is the CLI's line."""
    return re.escape(f"cannot read DiT checkpoint {path}: ") + CASES[case][2]


def expected_line(path, case) -> str:
    return "error: " + expected_message(path, case)


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_weights):
    """A working directory holding a writable copy of the tiny weights under weights/, for the test to damage."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    shutil.copytree(tiny_weights, tmp_path / "weights")
    return tmp_path


@pytest.fixture
def recorder(monkeypatch):
    """What a run got to: a DiT built (even on meta), the mesh joined (init_runtime), the loading begun."""
    seen = []

    def record(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.append(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)
    record(k4flash.dit.DiffusionTransformer3D, "__init__")
    record(parallel.runtime, "init_runtime")
    record(k4flash.pipeline, "load_pipeline")
    return seen


def written(workdir: Path) -> list:
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")
                  if p.is_file() and p.relative_to(workdir).parts[0] != "weights")


@pytest.mark.parametrize("case", CASES)
def test_each_break_is_named_from_the_file_alone(tmp_path, tiny_weights, tiny_safetensors, case):
    shutil.copy(tiny_weights / PT, tmp_path / PT)
    for intact in (tmp_path / PT, tiny_safetensors):
        check_checkpoint_file(intact)
    path = break_weights(tmp_path, case, tiny_safetensors)
    with pytest.raises(CheckpointError) as err:
        check_checkpoint_file(path)
    assert re.fullmatch(expected_message(path, case), str(err.value)), str(err.value)


def test_other_corrupt_files_are_named_and_a_legacy_pickle_is_left_to_torch_load(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read DiT checkpoint {garbage}: not a torch.save "
                                                        "checkpoint: it starts with b'not ', not a zip archive's")):
        check_checkpoint_file(garbage)
    other_zip = tmp_path / "other.pt"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match=r"a zip archive, but not a torch.save checkpoint \(it has no data.pkl"):
        check_checkpoint_file(other_zip)
    misshaped = tmp_path / "misshaped.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(misshaped))
    data = misshaped.read_bytes()
    misshaped.write_bytes(data.replace(b"[4,4]", b"[4,5]", 1))
    with pytest.raises(CheckpointError, match=r"tensor 'w' \(F32, shape \(4, 5\)\) needs 80 bytes, its data_offsets "
                                              r"\[0, 64\] give 64"):
        check_checkpoint_file(misshaped)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    check_checkpoint_file(legacy)  # not a zip: only torch.load (weights_only) can read it


@pytest.mark.parametrize("case", CASES)
def test_one_rank_refuses_every_break_before_anything_loads(workdir, tiny_safetensors, recorder, capsys, case):
    path = break_weights(workdir / "weights", case, tiny_safetensors)
    status, errors = run_cli(RUN, capsys)
    assert status == 2 and len(errors) == 1, errors
    assert re.fullmatch(expected_line(path.relative_to(workdir), case), errors[0]), errors[0]
    assert recorder == [] and not torch.distributed.is_initialized()  # no DiT built, no mesh, no loading begun
    assert written(workdir) == []


def test_with_downloads_allowed_a_broken_file_present_is_refused_first(workdir, tiny_safetensors, recorder, capsys,
                                                                        monkeypatch):
    """download=true and online: nothing is missing, so nothing is fetched, but the broken file is still refused
    before the mesh forms (not by whichever rank reaches it first while loading)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = break_weights(workdir / "weights", "st_mid_data", tiny_safetensors)
    status, errors = run_cli([*RUN, "download=true"], capsys)
    assert status == 2 and len(errors) == 1, errors
    assert re.fullmatch(expected_line(path.relative_to(workdir), "st_mid_data"), errors[0]), errors[0]
    assert recorder == [] and written(workdir) == []


def test_an_fp8_run_checks_the_fp8_conversion_it_would_read(workdir, tiny_safetensors, recorder, capsys):
    fp8 = workdir / "weights" / FP8
    shutil.copy(tiny_safetensors, fp8)
    fp8.write_bytes(fp8.read_bytes()[:-3])
    status, errors = run_cli([*RUN, "dit.quantize=fp8"], capsys)
    assert status == 2 and len(errors) == 1, errors
    assert re.fullmatch(expected_line(Path("weights") / FP8, "st_last_tensor"), errors[0]), errors[0]
    assert recorder == [] and written(workdir) == []


def test_the_python_api_refuses_before_building_the_dit(workdir, tiny_safetensors, recorder):
    from k4flash.pipeline import load_pipeline

    path = break_weights(workdir / "weights", "st_inside_json", tiny_safetensors)
    with pytest.raises(CheckpointError) as err:
        load_pipeline("cpu", cache_dir="weights", download=False, dit_params=TINY_DIT_PARAMS)
    assert re.fullmatch(expected_message(path.relative_to(workdir), "st_inside_json"), str(err.value)), str(err.value)
    assert recorder == ["load_pipeline"]  # entered, but refused before the DiT (or T5, or the VAE) was built


@pytest.mark.parametrize("quantize", ["none", "fp8"])
def test_each_loader_refuses_before_building_the_dit(tmp_path, tiny_weights, tiny_safetensors, recorder, quantize):
    """load_dit and the sharded loader (here rank 0 of a 2-way TP mesh given as coordinates: the refusal comes
    before any collective), for a bf16 and an FP8 model."""
    from parallel.load import load_dit_sharded

    shutil.copy(tiny_weights / PT, tmp_path / PT)
    path = break_weights(tmp_path, "st_mid_data", tiny_safetensors)
    for load in (load_dit, lambda params, p, **kw: load_dit_sharded(params, p, (None, 0, 2), **kw)):
        with pytest.raises(CheckpointError) as err:
            load(TINY_DIT_PARAMS, tmp_path / PT, quantize=quantize)
        assert re.fullmatch(expected_message(path, "st_mid_data"), str(err.value)), str(err.value)
    assert recorder == []


def test_read_checkpoint_names_the_break_too(tmp_path, tiny_weights, tiny_safetensors):
    """read_checkpoint (parallel.convert's reader) on a broken .safetensors or .pt: the same message, not the
    safetensors or miniz error."""
    shutil.copy(tiny_weights / PT, tmp_path / PT)
    for case in ("st_last_tensor", "pt_middle"):
        path = break_weights(tmp_path, case, tiny_safetensors)
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        assert re.fullmatch(expected_message(path, case), str(err.value)), str(err.value)


def test_a_broken_pt_beside_a_good_safetensors_is_not_refused(tmp_path, tiny_weights, tiny_safetensors):
    """The loader reads the .safetensors copy and never opens the .pt, so the check does not either."""
    shutil.copy(tiny_safetensors, tmp_path / ST)
    (tmp_path / PT).write_bytes((tiny_weights / PT).read_bytes()[:100])
    check_dit_checkpoint(tmp_path / PT)
    assert load_dit(TINY_DIT_PARAMS, tmp_path / PT) is not None


# run_inference_distil.py, each rank recording in $MARKERS whether it built a DiT or joined a process group.
RECORDING_ENTRY = '''"""run_inference_distil.py, recording in $MARKERS what this rank built or joined."""
import os, runpy, sys
from pathlib import Path
import torch.distributed
import k4flash.dit
entry, markers, rank = sys.argv.pop(1), Path(os.environ["MARKERS"]), os.environ.get("RANK", "0")
def recording(owner, name):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        (markers / f"{name}.rank{rank}").touch()
        return original(*args, **kwargs)
    setattr(owner, name, wrapper)
recording(k4flash.dit.DiffusionTransformer3D, "__init__")
recording(torch.distributed, "init_process_group")
sys.argv[0] = entry
runpy.run_path(entry, run_name="__main__")
'''


@pytest.mark.slow
@pytest.mark.parametrize("case, overrides", [("st_mid_data", ["parallel.tp=2"]), ("pt_last_bytes", [])])
def test_two_ranks_refuse_with_one_line_before_any_rank_builds_the_dit(tmp_path, tiny_weights, tiny_safetensors,
                                                                       case, overrides):
    shutil.copytree(tiny_weights, tmp_path / "weights")
    path = break_weights(tmp_path / "weights", case, tiny_safetensors)
    (tmp_path / "markers").mkdir()
    (tmp_path / "entry.py").write_text(RECORDING_ENTRY)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MARKERS=str(tmp_path / "markers"))
    command = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
               str(tmp_path / "entry.py"), str(ENTRY), *RUN, *overrides]
    started = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert re.fullmatch(expected_line(path.relative_to(tmp_path), case), errors[0]), errors[0]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "markers").iterdir()) == []  # no rank built a DiT or joined a group
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.py", "markers", "weights"]  # nothing written
    print(f"{case}: 2 ranks, exit {result.returncode} after {elapsed:.1f} s")
