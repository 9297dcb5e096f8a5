"""The unit costs an experiment config is sized from, measured on this machine: training tokens per second
(forward + backward + AdamW step), generated tokens per second (greedy, after a long prompt, as an agent turn) and
ScienceWorld simulator steps per second. The figures in ``configs/experiments/*.yaml`` headers come from here.

    python benchmarks/experiment_costs.py --model smollm2-135m-instruct   # or a directory, a .gguf file, hpl-tiny

The model: a name or directory ``hpl_lightning.models`` loads, or a ``*.gguf`` file (loaded and dequantised by
transformers; needs ``gguf`` and ``accelerate``). Prints one JSON line; note the machine's load (``uptime``) with it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def load(spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.endswith(".gguf"):
        path = Path(spec)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        return model, tokenizer
    from hpl_lightning.models import load_causal_lm, load_tokenizer

    return load_causal_lm(spec), load_tokenizer(spec)


def train_tokens_per_second(model, tokens: int, steps: int) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(100, 20000, (1, tokens))
    model(ids, labels=ids).loss.backward()  # warm-up
    optimizer.zero_grad()
    t0 = time.perf_counter()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return tokens * steps / (time.perf_counter() - t0)


@torch.no_grad()
def generated_tokens_per_second(model, prompt_tokens: int, new_tokens: int) -> tuple[float, float]:
    """(new tokens per second including the prompt's prefill, prefill seconds)."""
    model.eval()
    ids = torch.randint(100, 20000, (1, prompt_tokens))
    t0 = time.perf_counter()
    model(ids)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    assert out.shape[1] == prompt_tokens + new_tokens
    return new_tokens / (time.perf_counter() - t0), prefill


def simulator_steps_per_second(variations: int) -> float:
    """Gold-path steps of a few train variations, timing ``step`` only (not loading a variation)."""
    from hpl_lightning.envs.base import Task
    from hpl_lightning.envs.sciworld import SciWorldEnv, task_id

    env = SciWorldEnv(step_budget=False)
    try:
        steps, seconds = 0, 0.0
        for v in [("lifespan-longest-lived", 2), ("find-animal", 0), ("use-thermometer", 172)][:variations]:
            gold = env.gold_actions(Task(task_id(*v), ""))
            env.reset(env.task(*v))
            t0 = time.perf_counter()
            for action in gold:
                steps += 1
                if env.step(action).done:
                    break
            seconds += time.perf_counter() - t0
        return steps / seconds
    finally:
        env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train_tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompt_tokens", type=int, default=1024)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--variations", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, _ = load(args.model)
    result = {"model": args.model, "load_seconds": round(time.perf_counter() - t0, 1), "threads": args.threads,
              "load_average": os.getloadavg()}
    result["train_tokens_per_second"] = round(train_tokens_per_second(model, args.train_tokens, args.steps), 1)
    gen, prefill = generated_tokens_per_second(model, args.prompt_tokens, args.new_tokens)
    result.update(generated_tokens_per_second=round(gen, 2), prefill_seconds=round(prefill, 2))
    result["simulator_steps_per_second"] = round(simulator_steps_per_second(args.variations), 2)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
