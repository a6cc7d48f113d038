"""The Hugging Face helpers that models/ and train/ share: the parts of a causal LM
protege decodes and trains with, end-of-reply tokens, the KV-cache keyword, and int8
quantization for CPU serving. Base-model names resolve to folders in protege/bases.py.
"""

from __future__ import annotations

import contextlib

from ..errors import ProtegeError


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


def set_pooling(model, setting: str, spec: str = "model") -> str:
    """How a sequence classifier reads its input, returned for `sequence_logits`: `mean` (the
    mean of the token states, how sentence encoders such as all-MiniLM-L6-v2 were trained to
    embed; needs a head that is one linear layer, as the BERT family has) or `cls` (the model's
    own pooling, usually the first token). `auto`: mean where the head allows it, else cls.
    With mean, the encoder's own pooler computes nothing used (and DDP requires every parameter
    to take part), so it is removed from `model`."""
    import torch

    fits = isinstance(getattr(model, "classifier", None), torch.nn.Linear) and hasattr(model, "dropout")
    if setting == "auto":
        setting = "mean" if fits else "cls"
    elif setting == "mean" and not fits:
        raise ProtegeError(f"{spec}: pooling mean needs a model whose classification head is one linear layer (the "
                           f"BERT family; this is {type(model).__name__}): set pooling to cls or auto")
    elif setting not in ("mean", "cls"):
        raise ProtegeError(f"{spec}: pooling must be mean, cls or auto (got {setting!r})")
    if setting == "mean" and getattr(model.base_model, "pooler", None) is not None:
        model.base_model.pooler = None
    return setting


def sequence_logits(model, input_ids, attention_mask, pooling: str):
    """Logits of a sequence classifier under `pooling` (see set_pooling)."""
    if pooling == "cls":
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1)
    return model.classifier(model.dropout(pooled))


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off while loading a classifier: a new head is "missing from the
    checkpoint" by design, and a mean-pooled model was saved without the pooler it does not use."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
