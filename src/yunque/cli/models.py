"""Commands about model dirs and other tools' formats: info, import, export, quantize, pull, models, rm."""

from __future__ import annotations

import json

from yunque.cli.common import add_catalogue_flag, add_model_arg, command, model_path
from yunque.cli.flags import add_fields, choices_of
from yunque.config import QuantizeConfig


def register(sub) -> None:
    info = command(sub, "info", cmd_info, help="describe a model dir",
                   description="Describe a model: architecture, size, cost per token, context, tokenizer and how "
                               "it was trained.",
                   examples="  yunque info runs/speedrun\n  yunque info HuggingFaceTB/SmolLM2-135M-Instruct --json\n")
    add_model_arg(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")

    imp = command(sub, "import", cmd_import, help="convert a Hugging Face dir or a GGUF file into a yunque model dir",
                  description="Convert a Hugging Face dir (GPT-2, Llama 2/3, Mistral, Qwen2/3, SmolLM2, TinyLlama; "
                              "safetensors) or a GGUF file (llama.cpp, ollama; the same families, weights "
                              "dequantized to fp32) into a yunque model dir. Both also work directly wherever a "
                              "model dir is accepted.",
                  examples="  yunque import ~/models/SmolLM2-135M-Instruct runs/smol\n"
                           "  yunque import SmolLM2-135M-Instruct.Q4_1.gguf runs/smol\n")
    imp.add_argument("hf_dir", metavar="SOURCE", help="the Hugging Face model dir or .gguf file to read")
    imp.add_argument("out", metavar="OUT_DIR", help="the yunque model dir to write")
    imp.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds something")

    exp = command(sub, "export", cmd_export, help="write a model as a Hugging Face dir or a GGUF file",
                  description="Export a model dir for transformers (--format hf) or llama.cpp / ollama "
                              "(--format gguf). A quantized model (`yunque quantize`) goes to GGUF as Q8_0 (int8) "
                              "or Q4_0 (int4) unless --dtype says otherwise, requantized by the gguf library from "
                              "its dequantized weights; to Hugging Face dequantized.",
                  examples="  yunque export runs/speedrun --format hf runs/speedrun-hf\n"
                           "  yunque export runs/speedrun --format gguf speedrun.gguf --dtype q8_0\n"
                           "  yunque export runs/smol-int4 --format gguf smol-q4_0.gguf\n")
    add_model_arg(exp)
    exp.add_argument("--format", choices=["hf", "gguf"], required=True, help="hf: a transformers dir; gguf: one file")
    exp.add_argument("out", metavar="OUT", help="output dir (hf) or .gguf file")
    exp.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"], default=None,
                     help="GGUF tensor type of the matrices (default: f16; for a quantized model q8_0 or q4_0)")
    exp.add_argument("--force", action="store_true", help="replace OUT if it holds something")

    quant = command(sub, "quantize", cmd_quantize, help="write a model with int8 or int4 weights as a model dir",
                    description="Quantize MODEL's linear layers (weight-only: int8 with one scale per output "
                                "channel, or int4 with a scale and zero per group of inputs) and write the result "
                                "as a yunque model dir (integers and scales in model.safetensors) that every "
                                "command loads directly. MODEL may be a model dir, a Hugging Face dir or a GGUF "
                                "file.",
                    examples="  yunque quantize runs/speedrun/chat runs/chat-int8 --to int8\n"
                             "  yunque quantize SmolLM2-135M-Instruct.Q4_1.gguf runs/smol-int4 --to int4 "
                             "--group-size 64\n")
    add_model_arg(quant)
    quant.add_argument("out", metavar="OUT_DIR", help="the quantized model dir to write")
    quant.add_argument("--to", required=True, choices=choices_of(QuantizeConfig, "quantize"),
                       help="int8: one scale per output channel; int4: a scale and zero per group of --group-size "
                            "inputs")
    add_fields(quant, QuantizeConfig, ["group_size"])
    quant.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds something")

    pull = command(sub, "pull", cmd_pull, help="download a Hugging Face model (safetensors only) into the catalogue",
                   description="Download a model's safetensors, config and tokenizer files from the Hugging Face "
                               "Hub into the local catalogue (no pickled weights).",
                   examples="  yunque pull HuggingFaceTB/SmolLM2-135M-Instruct\n")
    pull.add_argument("repo_id", metavar="REPO_ID", help="e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    pull.add_argument("--revision", help="branch, tag or commit (default: main)")
    pull.add_argument("--token", help="Hugging Face token for gated or private repos (or set HF_TOKEN)")
    add_catalogue_flag(pull)

    models = command(sub, "models", cmd_models, help="list the models in the local catalogue",
                     description="List the models in the local catalogue with their size and format.",
                     examples="  yunque models\n  yunque models --catalogue ~/my-models\n")
    add_catalogue_flag(models)

    rm = command(sub, "rm", cmd_rm, help="delete a model from the local catalogue",
                 description="Delete a model from the local catalogue.",
                 examples="  yunque rm HuggingFaceTB/SmolLM2-135M-Instruct\n")
    rm.add_argument("name", metavar="NAME", help="the model's catalogue name (as `yunque models` lists it)")
    add_catalogue_flag(rm)


def cmd_info(args) -> int:
    from yunque.modeldir import describe

    d = describe(model_path(args.model, args.catalogue))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for key, value in d.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:>18}: {value}")
    return 0


def cmd_import(args) -> int:
    from pathlib import Path

    if Path(args.hf_dir).is_file():
        from yunque.interop.gguf_reader import import_gguf

        import_gguf(args.hf_dir, args.out, force=args.force)
    else:
        from yunque.interop.hf import import_hf

        import_hf(args.hf_dir, args.out, force=args.force)
    print(f"imported {args.hf_dir} -> {args.out}")
    return 0


def cmd_export(args) -> int:
    src = model_path(args.model, args.catalogue)
    if args.format == "hf":
        from yunque.interop.hf import export_hf

        export_hf(src, args.out, force=args.force)
    else:
        try:
            from yunque.interop.gguf import export_gguf
        except ModuleNotFoundError:
            raise ValueError("GGUF export needs the gguf package; pip install 'yunque[gguf]'") from None
        export_gguf(src, args.out, dtype=args.dtype, force=args.force)
    print(f"exported {src} -> {args.out} ({args.format})")
    return 0


def cmd_quantize(args) -> int:
    from yunque.interop.quantize import quantize_dir
    from yunque.model.quant import describe_quantization

    QuantizeConfig(args.to, args.group_size)  # checks the flags' values
    src = model_path(args.model, args.catalogue)
    scheme = quantize_dir(src, args.out, method=args.to, group_size=args.group_size, force=args.force)
    print(f"quantized {src} -> {args.out} ({describe_quantization(scheme)})")
    return 0


def cmd_pull(args) -> int:
    from yunque.interop.catalogue import catalogue_dir, pull

    path = pull(args.repo_id, root=catalogue_dir(args.catalogue), revision=args.revision, token=args.token)
    print(f"{args.repo_id} -> {path}")
    return 0


def cmd_models(args) -> int:
    from yunque.interop.catalogue import catalogue_dir, format_table, list_models

    root = catalogue_dir(args.catalogue)
    rows = list_models(root)
    print(format_table(rows) if rows else f"no models in {root}; `yunque pull REPO_ID` downloads one")
    return 0


def cmd_rm(args) -> int:
    from yunque.interop.catalogue import catalogue_dir, remove

    print(f"removed {remove(args.name, root=catalogue_dir(args.catalogue))}")
    return 0
