"""A causal specialist (the merged model folder) as one GGUF file for llama.cpp.

Written with the `gguf` package: the Llama-family weights (Llama, SmolLM, Mistral-style
configs; the query and key projections permuted to llama.cpp's rotary layout), the model's
hyperparameters, and its byte-level BPE tokenizer (tokens, types, merges, special ids and
chat template). llama.cpp recognises a tokenizer's pre-tokenizer by name; protege writes
the names llama.cpp knows, in turn, into a vocabulary-only file and keeps the first whose
tokens match the Hugging Face tokenizer's on a probe text (digits, spaces, punctuation,
accents, newlines), so a GGUF never tokenizes differently from the model it came from.

Quantisation (`f16`, `q8_0`, `q4_k_m`) is llama.cpp's own quantizer, through
llama-cpp-python, from the f32 file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ProtegeError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
PRE_TOKENIZERS = ("smollm", "llama-bpe", "qwen2", "gpt-2", "deepseek-llm", "tekken", "olmo", "falcon3", "gpt-4o",
                  "starcoder", "default")
PROBE = ("Hello World! my card 4242 4242 was charged 1,234.56 EUR twice...\n\n  Where's my refund?\tÉté: "
         "naïve café, 12345678 tokens; don't CAN'T won't  x2 3rd #7 $9.99 (ok) [a] {b} <c> ~!?")
FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def export_gguf(folder: Path, meta: dict, out: Path, quantize: str) -> None:
    """`out/model.gguf` (plus the tokenizer files, which render the task's chat prompt)."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ProtegeError("GGUF export needs the gguf and llama-cpp-python packages: pip install 'protege[ml]'") \
            from None
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [MODEL_TYPES.get(config.get("model_type"), config.get("model_type"))])[0]
    if arch not in ARCHITECTURES:
        raise ProtegeError(f"{folder}: GGUF export writes Llama-family models ({', '.join(ARCHITECTURES)}); this one "
                           f"is {arch}: export it as merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise ProtegeError(f"{folder}: its config scales RoPE ({config.get('rope_scaling') or rope}), which this GGUF "
                           "writer does not carry over: export it as merged and convert it with llama.cpp's converter")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = _vocab(folder, tokenizer, config)
    pre = _pre_tokenizer(out, vocab, tokenizer)
    f32 = out / ("model.gguf" if quantize == "f32" else "model-f32.gguf")
    _write(f32, folder, config, vocab, pre, meta, tokenizer)
    if quantize != "f32":
        _quantize(f32, out / "model.gguf", quantize)
        f32.unlink()
    tokenizer.save_pretrained(out)


def _rope(config: dict) -> dict:
    """RoPE settings: transformers 5 writes them as `rope_parameters`, 4.x as top-level keys."""
    return config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}


def _vocab(folder: Path, tokenizer, config: dict) -> dict:
    """Tokens, their types and the merges of a byte-level BPE tokenizer, as GGUF stores them."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ProtegeError(f"{folder}: GGUF export writes byte-level BPE tokenizers (tokenizer.json with a BPE model); "
                           f"this one is {model.get('type') or 'not a tokenizer.json'}")
    size = max(config.get("vocab_size") or 0, len(tokenizer))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # unused
        else:
            tokens.append(by_id[i])
            types.append(3 if added.get(i, {}).get("special") else 4 if i in added else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _tokenizer_meta(writer, vocab: dict, pre: str, tokenizer) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
           "unk": tokenizer.unk_token_id}
    for name, tid in ids.items():
        if tid is not None:
            getattr(writer, f"add_{name}_token_id")(tid)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(out: Path, vocab: dict, tokenizer) -> str:
    """The first pre-tokenizer name under which llama.cpp tokenizes the probe as the Hugging
    Face tokenizer does."""
    import gguf

    from .llamacpp import vocab_tokens

    want = tokenizer(PROBE, add_special_tokens=False).input_ids
    probe = out / "vocab-probe.gguf"
    try:
        for pre in PRE_TOKENIZERS:
            writer = gguf.GGUFWriter(str(probe), "llama")
            writer.add_block_count(1)
            _tokenizer_meta(writer, vocab, pre, tokenizer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            if vocab_tokens(probe, PROBE) == want:
                return pre
    finally:
        probe.unlink(missing_ok=True)
    raise ProtegeError("no pre-tokenizer llama.cpp knows tokenizes like this model's tokenizer "
                       f"(tried {', '.join(PRE_TOKENIZERS)}): export it as merged and convert it with llama.cpp's "
                       "convert_hf_to_gguf.py")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path: Path, folder: Path, config: dict, vocab: dict, pre: str, meta: dict, tokenizer) -> None:
    import gguf
    from safetensors import safe_open

    n_layer, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"protege {meta.get('task', '')} {meta.get('method', '')} {meta.get('run_id') or folder.name}")
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(_rope(config).get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(len(vocab["tokens"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _tokenizer_meta(writer, vocab, pre, tokenizer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ProtegeError(f"{folder} has no safetensors weights to convert")
    seen = set()
    for file in files:
        with safe_open(str(file), framework="np") as f:
            for key in f.keys():
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if key == "lm_head.weight" and config.get("tie_word_embeddings", False):
                    # llama.cpp reads the token embeddings as the output layer; a tied model saved
                    # with its shared tensor once may keep it under this name only
                    if "model.embed_tokens.weight" in f.keys():
                        continue
                    name = "token_embd.weight"
                if name is None:
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ProtegeError(f"{file.name}: tensor {key} has no place in a llama GGUF")
                data = f.get_tensor(key).astype(np.float32)
                if key.endswith("q_proj.weight"):
                    data = _permute(data, heads)
                elif key.endswith("k_proj.weight"):
                    data = _permute(data, kv_heads)
                writer.add_tensor(name, data)
                seen.add(name)
    if "token_embd.weight" not in seen:
        raise ProtegeError(f"{folder}: no token embeddings (model.embed_tokens.weight) among its weights")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quantize(src: Path, dest: Path, quantize: str) -> None:
    import os

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quantize])
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params)
    if code != 0 or not dest.exists():
        raise ProtegeError(f"llama.cpp could not quantize {src.name} to {quantize} (code {code})")
