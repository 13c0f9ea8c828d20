"""Hugging Face tensor names <-> yunque's, written down once: loading concatenates along this table, exporting
splits along it. yunque fuses projections that HF keeps apart:

    yunque                GPT-2 (Conv1D, stored (in, out))    Llama family (nn.Linear, stored (out, in))
    attn.qkv  [q; k; v]   attn.c_attn (already fused)         self_attn.q_proj, k_proj, v_proj
    mlp.up    [gate; up]  mlp.c_fc (GELU: no gate)            mlp.gate_proj, mlp.up_proj
"""

from __future__ import annotations

from dataclasses import dataclass

from yunque.model.gpt import GPT
from yunque.modeldir import weights_of


@dataclass(frozen=True)
class HFTensor:
    """One yunque tensor and the HF tensors it is made of, stacked along dim 0: `rows` of each, in order."""

    name: str
    hf: tuple[str, ...]
    rows: tuple[int, ...]
    transpose: bool  # GPT-2's Conv1D stores weights as (in, out)


GPT2_NAMES = {"tok_emb": "{p}wte", "pos_emb": "{p}wpe", "norm_f": "{p}ln_f", "lm_head": "lm_head",
              "norm1": "{p}h.{i}.ln_1", "norm2": "{p}h.{i}.ln_2", "attn.qkv": "{p}h.{i}.attn.c_attn",
              "attn.proj": "{p}h.{i}.attn.c_proj", "mlp.up": "{p}h.{i}.mlp.c_fc", "mlp.down": "{p}h.{i}.mlp.c_proj"}
LLAMA_NAMES = {"tok_emb": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head",
               "norm1": "model.layers.{i}.input_layernorm", "norm2": "model.layers.{i}.post_attention_layernorm",
               "attn.qkv": ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                            "model.layers.{i}.self_attn.v_proj"),
               "attn.proj": "model.layers.{i}.self_attn.o_proj", "attn.q_norm": "model.layers.{i}.self_attn.q_norm",
               "attn.k_norm": "model.layers.{i}.self_attn.k_norm",
               "mlp.up": ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"),
               "mlp.down": "model.layers.{i}.mlp.down_proj"}
_CONV1D = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")


def layout(model: GPT, *, gpt2_prefix: str = "transformer.") -> list[HFTensor]:
    """Every stored yunque tensor with the HF tensors it maps to (GPT-2 names take `gpt2_prefix`)."""
    cfg = model.cfg
    gpt2 = cfg.pos == "learned"
    table = GPT2_NAMES if gpt2 else LLAMA_NAMES
    q, kv = cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    split = {"attn.qkv": (q, kv, kv), "mlp.up": (cfg.ff_dim, cfg.ff_dim)}
    out = []
    for name, tensor in weights_of(model).items():
        module, leaf = name.rsplit(".", 1)  # "blocks.3.attn.qkv", "weight"
        i, key = module.split(".", 2)[1:] if module.startswith("blocks.") else ("", module)
        hf = table[key] if isinstance(table[key], tuple) else (table[key],)
        hf = tuple(f"{h.format(p=gpt2_prefix, i=i)}.{leaf}" for h in hf)
        rows = split[key] if len(hf) > 1 else (tensor.shape[0],)
        out.append(HFTensor(name, hf, rows, gpt2 and leaf == "weight" and key in _CONV1D))
    return out


__all__ = ["GPT2_NAMES", "LLAMA_NAMES", "HFTensor", "layout"]
