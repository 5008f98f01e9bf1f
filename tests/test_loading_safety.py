"""Loading never runs code from a weights folder: weights_only unpickling, safetensors first, no remote code."""
import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from k4flash.text_encoder import T5TextEncoder
from k4flash.tiny import TINY_DIT_PARAMS, tiny_dit_state_dict
from k4flash.weights import CheckpointError, load_dit

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs Path.touch(marker): the classic pickle code-execution trick."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**tiny_dit_state_dict(), "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot read DiT checkpoint"):
        load_dit(TINY_DIT_PARAMS, path)
    assert not marker.exists()


def test_a_safetensors_copy_is_preferred_so_the_pickle_is_never_opened(tmp_path):
    marker = tmp_path / "pwned"
    state = tiny_dit_state_dict()
    torch.save({**state, "payload": _Payload(marker)}, tmp_path / "dit.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "dit.safetensors"))
    model = load_dit(TINY_DIT_PARAMS, tmp_path / "dit.pt")
    torch.testing.assert_close(model.state_dict()["out_layer.out_layer.weight"], state["out_layer.out_layer.weight"])
    assert not marker.exists()


def test_custom_tokenizer_code_in_the_weights_folder_is_not_run(tiny_weights, tmp_path):
    tokenizer = Path(shutil.copytree(tiny_weights / "tokenizer", tmp_path / "tokenizer"))
    marker = tmp_path / "pwned"
    (tokenizer / "evil_tokenizer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import T5Tokenizer\nclass EvilTokenizer(T5Tokenizer):\n    pass\n")
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        encoder = T5TextEncoder(tiny_weights / "text_encoder", tokenizer)
        assert type(encoder.tokenizer).__name__ != "EvilTokenizer"
    except ValueError as err:  # transformers refuses a folder that asks for remote code
        assert "trust_remote_code" in str(err)
    assert not marker.exists()


def _calls(name):
    for path in [*ROOT.glob("k4flash/**/*.py"), *ROOT.glob("parallel/**/*.py"), *ROOT.glob("launch/**/*.py"),
                 *ROOT.glob("bench/**/*.py"), ROOT / "run_inference_distil.py"]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                yield path, node


def test_every_torch_load_is_weights_only_and_no_call_trusts_remote_code():
    loads = list(_calls("load"))
    torch_loads = [(p, n) for p, n in loads if isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"]
    assert torch_loads, "the scan found no torch.load at all: it is not looking at the code"
    for path, node in torch_loads:
        flags = {k.arg: k.value for k in node.keywords}
        assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, \
            f"{path.name}:{node.lineno} torch.load without weights_only=True"
    for path, node in _calls("from_pretrained"):
        for keyword in node.keywords:
            if keyword.arg == "trust_remote_code":
                assert isinstance(keyword.value, ast.Constant) and keyword.value.value is False, \
                    f"{path.name}:{node.lineno} trust_remote_code is not False"
