"""Model dirs in and out of other tools: Hugging Face directories (hf.py) and GGUF files for llama.cpp (gguf.py).

Submodules are imported on use: `gguf.py` needs the optional `gguf` package.
"""
