"""Packaging promises: run-time imports are torch/triton/safetensors/tokenizers/numpy only, and the top-level
kernels/ folder is installed as `minilora.kernels`, never as a top-level `kernels` that would shadow PyPI's
`kernels` package (which transformers and bitsandbytes probe for)."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORACLES = ("transformers", "peft", "bitsandbytes", "jinja2", "accelerate")


def run_python(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def without_the_checkout_on_the_path() -> dict:
    """This environment minus PYTHONPATH entries naming this checkout: a checkout on the path puts its top-level
    kernels/ folder there, which says nothing about what an installed minilora provides."""
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    kept = [e for e in entries if e and Path(e).resolve() != REPO]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(kept)}


def test_minilora_runs_with_the_oracles_unimportable(tmp_path):
    """Block every oracle library, import every minilora module and kernel, build and run a model."""
    modules = sorted(".".join(p.relative_to(REPO / "minilora").with_suffix("").parts)
                     for p in (REPO / "minilora").rglob("*.py")  # subpackages too (rglob skips the kernels link)
                     if p.stem not in ("__init__", "__main__") and "kernels" not in p.parts)
    code = f"""
        import importlib, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {ORACLES!r}:
                    raise ImportError("minilora must not import " + name)
        sys.meta_path.insert(0, Block())
        import minilora, minilora.kernels.nf4_dequant, minilora.kernels.nf4_matmul
        for name in {modules!r}:
            importlib.import_module("minilora." + name)
        import torch
        from minilora.config import ModelConfig
        from minilora.model import Transformer
        cfg = ModelConfig(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
        logits = Transformer(cfg)(torch.tensor([[1, 2, 3]]))
        assert logits.shape == (1, 3, 50)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {ORACLES!r})
        assert not loaded, loaded
        print("ok")
    """
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_kernels_folder_does_not_shadow_pypi_kernels(tmp_path):
    """Beside an installed minilora, `kernels` is not importable (unless PyPI's is installed), transformers
    reports no kernels package, and bitsandbytes' CPU path runs without tripping over ours."""
    code = f"""
        import importlib.util, minilora.kernels, torch
        spec = importlib.util.find_spec("kernels")
        print("kernels spec:", None if spec is None else spec.origin)
        assert spec is None or "minilora" not in str(spec.origin) and {str(REPO)!r} not in str(spec.origin)
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.utils import is_kernels_available
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)
        print("is_kernels_available:", is_kernels_available())
        import bitsandbytes.functional as F
        q, state = F.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
        assert F.dequantize_4bit(q, state).shape == (64, 64)
        print("ok")
    """
    env = without_the_checkout_on_the_path()
    if run_python("import minilora", tmp_path, env).returncode != 0:
        pytest.skip("minilora is not installed (only on PYTHONPATH): this test checks an installed minilora")
    result = run_python(code, tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout
    assert "from 'kernels'" not in result.stderr  # bnb did not import our folder as PyPI's kernels
    if importlib.util.find_spec("kernels") is None:  # PyPI's kernels is not installed here
        assert "is_kernels_available: False" in result.stdout


def test_top_level_kernels_is_not_an_installed_package():
    """The distribution's top-level packages are minilora only (pyproject's explicit package list)."""
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "kernels" not in packages and "minilora.kernels" in packages
    assert (REPO / "minilora" / "kernels").resolve() == (REPO / "kernels").resolve()


def test_every_subpackage_is_installed():
    """pyproject's explicit package list names every folder of minilora/ that is a package: a non-editable install
    (a wheel) would otherwise leave it out, and `import minilora.quant` would fail there although it works here."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"minilora." + ".".join(p.parent.relative_to(REPO / "minilora").parts) if p.parent != REPO / "minilora"
             else "minilora" for p in (REPO / "minilora").glob("**/__init__.py")}
    found.add("minilora.kernels")  # the link to the top-level kernels/ folder
    assert listed == found, (sorted(found - listed), sorted(listed - found))
