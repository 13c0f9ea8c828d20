"""`yunque quantize`: a model of any format written as a quantized yunque model dir.

The dir is a yunque model dir whose config.json carries "quantization" and whose model.safetensors holds, for each
quantized linear layer, the integers and scales (`QuantLinear`'s buffers: qweight, scales, zeros) in place of its
weight; embeddings, norms and a tied output head stay in floating point. `load_model` reads it back as the same
model, and every command that takes a model takes it (see modeldir.load_yunque). The side files that carry the chat
template, special tokens and stop ids come along, from a dir or from a GGUF file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from yunque.atomic import atomic_write
from yunque.interop.hf import EXTRA_FILES
from yunque.interop.hf_tokenizer import GENERATION_CONFIG, TOKENIZER_CONFIG, side_file
from yunque.model.quant import describe_quantization, quantization_of, quantize_model
from yunque.modeldir import load_model, save_model
from yunque.outputs import check_output, staged_dir


def quantize_dir(source: str | Path, out_dir: str | Path, *, method: str, group_size: int = 32,
                 force: bool = False) -> dict[str, int | str]:
    """Write `source` (a model dir, Hugging Face dir or GGUF file) with its linear layers quantized (`method`
    "int8" or "int4", `group_size` for int4) as a yunque model dir at `out_dir`; returns the scheme written.
    ValueError for a model quantized already, a group size that does not fit, or an `out_dir` that exists
    (unless `force`); the output appears whole or not at all."""
    source, out_dir = Path(source), Path(out_dir)
    check_output(out_dir, force=force, sources=(source,))
    model, tokenizer = load_model(source)
    if (done := quantization_of(model)) is not None:
        raise ValueError(f"{source} is quantized already ({describe_quantization(done)}); quantize its "
                         f"floating-point original instead")
    quantize_model(model, method, group_size)
    sides = {name: side_file(source, name) for name in (TOKENIZER_CONFIG, GENERATION_CONFIG)}
    with staged_dir(out_dir, force=force, sources=(source,)) as staging:
        save_model(staging, model, tokenizer)
        for name, obj in sides.items():
            if obj:
                text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
                atomic_write(staging / name, lambda p, text=text: Path(p).write_text(text, encoding="utf-8"))
        for name in EXTRA_FILES:
            if name not in sides and source.is_dir() and (source / name).is_file():
                atomic_write(staging / name, lambda p, src=source / name: shutil.copyfile(src, p))
    return quantization_of(model)


__all__ = ["quantize_dir"]
