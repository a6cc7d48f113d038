"""`protege export`: a trained specialist in the format the runtime a team picks reads.

    onnx    an encoder classifier as one ONNX graph (input_ids, attention_mask -> logits,
            pooling inside), its tokenizer and label map beside it; `--quantize int8`:
            ONNX Runtime's dynamic int8 weights
    gguf    a causal specialist (the merged LoRA model) as one GGUF file for llama.cpp;
            `--quantize f16|q8_0|q4_k_m` through llama.cpp's own quantizer (models/gguf_export.py)
    merged  the merged safetensors model folder with its tokenizer (transformers, vLLM)
    peft    the LoRA adapter (PEFT) of a lora run, for a base model loaded beside it

Every export is a folder written whole or not at all (fsutil.folder_in_place) with a
`protege.json` that says what it is, so `protege bench -c FOLDER`-style loading
(`models/trained.specialist`) and `protege serve FOLDER` read it back. `check` answers
rows with the source and the export and counts where they differ: the export verb runs
it on validation rows, so a user sees the cost of a quantisation before serving it.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from pathlib import Path

import orjson

from ..errors import ProtegeError
from ..fsutil import folder_in_place

FORMATS = ("onnx", "gguf", "merged", "peft")
QUANTIZE = {"onnx": ("none", "int8"), "gguf": ("f32", "f16", "q8_0", "q4_k_m"), "merged": ("none",),
            "peft": ("none",)}
CLASSIFIERS = ("classifier",)
CAUSAL = ("lora", "full", "distill", "grpo")


def default_quantize(fmt: str) -> str:
    return QUANTIZE[fmt][0]


def export(folder: Path, meta: dict, fmt: str, out: Path, quantize: str | None = None, *,
           run_id: str | None = None) -> Path:
    """Write the export of the model folder `folder` (made by protege train; `meta` is its
    protege.json) as `fmt` into `out`; returns `out`."""
    if fmt not in FORMATS:
        raise ProtegeError(f"export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    quantize = quantize or default_quantize(fmt)
    if quantize not in QUANTIZE[fmt]:
        raise ProtegeError(f"--quantize {quantize} does not apply to {fmt}: choose {' or '.join(QUANTIZE[fmt])}")
    method = meta.get("method")
    name = run_id or meta.get("run_id") or folder.name
    if fmt == "onnx" and method not in CLASSIFIERS:
        raise ProtegeError(f"run {name} is a {method} model: ONNX export is for encoder classifiers (method classifier); "
                           "export a causal specialist as gguf, merged or peft")
    if fmt == "gguf" and method not in CAUSAL:
        raise ProtegeError(f"run {name} is a {method} model: GGUF export is for causal specialists "
                           f"({', '.join(CAUSAL)}); export a classifier as onnx")
    if fmt in ("merged", "peft") and method not in CAUSAL:
        raise ProtegeError(f"run {name} is a {method} model: {fmt} export is for causal specialists; its model folder "
                           f"{folder} is already a plain transformers folder")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "protege.json").exists():
        raise ProtegeError(f"{out} exists and is not an export of protege's: choose an empty or new folder")
    with folder_in_place(out, prefix=f".{out.name}-") as tmp:
        if fmt == "onnx":
            export_onnx(folder, meta, tmp, quantize)
        elif fmt == "gguf":
            from .gguf_export import export_gguf

            export_gguf(folder, meta, tmp, quantize)
        elif fmt == "merged":
            _copy_folder(folder, tmp)
        else:
            adapter = folder.parent / "adapter"
            if not (adapter / "adapter_config.json").exists():
                raise ProtegeError(f"run {name} was trained with method {method}, which leaves no LoRA adapter "
                                   f"({adapter} is missing): export it as merged")
            _copy_folder(adapter, tmp)
        record = {**meta, "format": fmt, "quantize": quantize, "run_id": meta.get("run_id") or run_id,
                  "source": str(folder)}
        (tmp / "protege.json").write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
    return out


def _copy_folder(src: Path, dest: Path) -> None:
    for item in src.iterdir():
        if item.name in ("protege.json",) or item.name.startswith("."):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest / item.name)


def _logits_module(model, pooling: str):
    """input_ids, attention_mask -> logits under the run's pooling: the graph ONNX gets."""
    import torch

    from .hf import sequence_logits

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return sequence_logits(self.model, input_ids, attention_mask, pooling)

    return Logits().eval()


def export_onnx(folder: Path, meta: dict, out: Path, quantize: str) -> None:
    """model.onnx (fp32, or int8 weights through ONNX Runtime's dynamic quantisation) with the
    tokenizer files beside it; dynamic batch and sequence axes."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .hf import quiet_transformers, set_pooling

    try:
        import onnxruntime.quantization as ortq
    except ImportError:
        raise ProtegeError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'protege[ml]'") from None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    pooling = set_pooling(model, meta.get("pooling", "cls"), str(folder))
    sample = tokenizer(["an example request", "a second, longer example request to trace"], padding=True,
                       return_tensors="pt")
    fp32 = out / ("model.onnx" if quantize == "none" else "model-fp32.onnx")
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 1: torch.export.Dim("sequence", min=1, max=8192)}
    # the dynamo exporter prints its progress, which `--json` callers would have to parse, and
    # logs what it skips (torchvision's operators), which says nothing about this model
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")  # the exporter's own deprecation notes, not the user's concern
        torch.onnx.export(_logits_module(model, pooling), (sample["input_ids"], sample["attention_mask"]), str(fp32),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": dims, "attention_mask": dims}, external_data=False,
                          dynamo=True, verbose=False)
    if quantize == "int8":
        with _quiet_logger(""):  # "consider pre-processing": advice the bench's measured accuracy answers
            ortq.quantize_dynamic(str(fp32), str(out / "model.onnx"), weight_type=ortq.QuantType.QInt8)
        fp32.unlink()
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Only errors from the logger `name` ("" is the root) while the block runs."""
    import logging

    logger = logging.getLogger(name or None)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check(source, exported, rows: list[dict]) -> dict:
    """Answer `rows` with both candidates: how many answers differ, and the largest gap between
    the two probabilities of the same label (classifiers; None where either has none)."""
    a, b = source.predict(rows), exported.predict(rows)
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x.output != y.output]
    gap = None
    if all(x.label_probs and y.label_probs for x, y in zip(a, b)):
        gap = max(abs(x.label_probs[k] - y.label_probs.get(k, 0.0)) for x, y in zip(a, b) for k in x.label_probs)
    elif all(x.confidence is not None and y.confidence is not None for x, y in zip(a, b)):
        same = [(x, y) for x, y in zip(a, b) if x.output == y.output]
        gap = max((abs(x.confidence - y.confidence) for x, y in same), default=None)
    return {"rows": len(rows), "differ": len(differ), "agreement": 1 - len(differ) / len(rows) if rows else None,
            "max_prob_gap": gap, "examples": [{"input": rows[i]["input"], "source": a[i].output,
                                               "export": b[i].output} for i in differ[:5]]}
