"""Builds the bundled tiny model directory (config + tokenizer, no weights) used by the quickstart and the tests.

The tokenizer is a byte-level BPE trained on the bundled agent data, with a Qwen2-style chat template, so every
code path (chat template, assistant masks, special tokens) is the one a real Qwen2.5 checkpoint goes through. The
weights are initialised from the config with a fixed seed when the model is loaded (see ``models.load_causal_lm``).

Run from the repository root: ``python scripts/build_tiny_model.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "hpl_lightning" / "assets" / "tiny-qwen2"
CORPUS = ROOT.parent / "shared" / "data" / "intercode_sql" / "gpt-3.5_react_10_turns.json"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's template without its tool-calling branches: system default, <|im_start|>role\ncontent<|im_end|>\n.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def corpus_lines() -> list[str]:
    episodes = json.loads(CORPUS.read_text())
    lines = []
    for episode in episodes.values():
        history = episode["turn_history"]
        for key in ("thoughts", "actions", "observations"):
            lines.extend(str(x) for x in history[key])
    return lines


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    fast.model_max_length = 8192
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    config.save_pretrained(OUT)
    print(f"wrote {OUT} (vocab {len(fast)})")


if __name__ == "__main__":
    main()
