"""``hpl-evaluate`` (or ``python evaluate.py``): evaluate agents and check environments.

    hpl-evaluate run --benchmark intercode_sql --split test --policy runs/.../last.ckpt --workers 8
    hpl-evaluate run --benchmark sciworld --split dev --policy exported/ --workers 2
    hpl-evaluate run --benchmark intercode_sql --policy Qwen/Qwen2.5-7B-Instruct --base_url http://host:8000/v1
    hpl-evaluate replay --recordings ../shared/data/intercode_sql/gpt-3.5_react_10_turns.json
    hpl-evaluate gold --benchmark sciworld --split dev
    hpl-evaluate window --episodes '[runs/.../episodes.jsonl]' --model smollm2-135m-instruct --max_context 2048

``run`` is resumable: run the same command again after a crash or Ctrl-C and it continues where it stopped.
Every subcommand takes ``--config FILE.yaml`` and ``--print_config``; ``hpl-evaluate run --help`` lists all.
A run in which no episode could be scored (e.g. the environment is unreachable) exits with status 1 and the reason.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from jsonargparse import CLI

from hpl_lightning.console import ShortErrorParser, one_line_errors
from hpl_lightning.envs.intercode_replay import ReplayStopped, replay, start_server
from hpl_lightning.envs.sciworld import gold
from hpl_lightning.errors import UsageError
from hpl_lightning.evaluation import EpisodeRecord, EvaluationAborted, evaluate, read_episodes
from hpl_lightning.models import load_tokenizer
from hpl_lightning.policies import MAX_NEW_TOKENS, Conversation, OpenAIPolicy, Policy
from hpl_lightning.prefix_cache import DEFAULT_ENGINE, Engine, local_policy
from hpl_lightning.schema import head_length


def run(
    benchmark: str = "intercode_sql",
    split: str = "test",
    policy: str = "hpl-tiny",
    output_dir: str | None = None,
    workers: int = 4,
    limit: int | None = None,
    task_ids: list[str] | None = None,
    db_url: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_context: int | None = None,
    engine: Engine = DEFAULT_ENGINE,
    batch_size: int = 16,
    threads: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    base_url: str | None = None,
    api_key: str | None = None,
    concurrency: int = 16,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Runs a policy as a ReAct agent (greedy) on a benchmark split; writes episodes.jsonl, summary.json and
    outcomes.png to ``output_dir`` and prints the summary table.

    Args:
        benchmark: intercode_sql or sciworld.
        split: intercode_sql: test (the 200 IPR/HPL tasks), train; sciworld: dev (seen), test (unseen).
        policy: a Lightning .ckpt, an exported or Hugging Face model directory/name, or hpl-tiny; with
            ``base_url``, the model name the server serves.
        output_dir: default runs/eval/<benchmark>-<split>-<policy name>; rerunning into it resumes.
        workers: environments = episodes in flight = the model's batch per turn (a JVM each for sciworld).
        limit: only the first N tasks of the split.
        task_ids: only these task ids.
        db_url: intercode_sql server; default: start (or reuse) the local one with scripts/start_mysql.sh.
        env_kwargs: more environment options (e.g. {"call_timeout": 120} for sciworld).
        max_new_tokens: per agent turn (a ReAct thought + action fits in 128 tokens; the paper allows 512).
        max_context: a local model's context in tokens (default: its window); the oldest turns after the task
            statement are dropped to fit, as in training. A smaller cap makes CPU evaluation cheaper.
        engine: how a local model computes a turn: ``prefix-cache`` continues each episode from its KV cache, the
            prefixes episodes share encoded once, every episode in flight in one batch; ``recompute`` re-encodes
            every context at every turn (the reference; same greedy text, docs/evaluation-speed.md).
        batch_size: largest generate() batch of a local model with the ``recompute`` engine.
        threads: torch CPU threads while generating (1 is fastest for tiny models on a busy machine).
        dtype: local model weights (float32, bfloat16, float16).
        device: cpu or cuda.
        base_url: an OpenAI-compatible endpoint (e.g. vLLM's http://host:8000/v1) instead of a local model.
        api_key: for ``base_url`` (default $OPENAI_API_KEY).
        concurrency: requests in flight to ``base_url``.
        timeout: seconds per request to ``base_url``.
    """
    agent: Policy
    if base_url is not None:
        agent = OpenAIPolicy(policy, base_url=base_url, api_key=api_key, max_tokens=max_new_tokens,
                             concurrency=concurrency, timeout=timeout)
    else:
        agent = local_policy(policy, engine, max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype,
                             device=device, threads=threads, max_context=max_context)
    kwargs = dict(env_kwargs or {})
    if benchmark == "intercode_sql":
        try:
            kwargs["db_url"] = db_url or start_server()
        except subprocess.CalledProcessError as e:
            reason = (e.stderr or "").strip().splitlines()[-1:] or [f"exit status {e.returncode}"]
            raise UsageError(f"scripts/start_mysql.sh could not start the InterCode-SQL server: {reason[0]} "
                            "(or pass --db_url)") from e
        if db_url is None:
            print(f"InterCode-SQL server: {kwargs['db_url']} (scripts/start_mysql.sh); it keeps running after this "
                  "evaluation, `make stop-db` (scripts/stop_mysql.sh) stops it")
    name = Path(policy.rstrip("/")).name.removesuffix(".ckpt")
    out = output_dir or str(Path("runs") / "eval" / f"{benchmark}-{split}-{name}")
    return evaluate(agent, benchmark, split, out, workers=workers, limit=limit, task_ids=task_ids, env_kwargs=kwargs)


def cut_turns(record: EpisodeRecord, tokenizer: Any, budget: int) -> list[bool]:
    """Per agent turn of an episode, whether its prompt (the conversation before that turn, rendered as
    ``LocalPolicy.prompt_ids`` renders it) was over ``budget`` tokens, i.e. whether the policy dropped old turns.
    (Here, not in ``evaluation``/``policies``: a study's stages fingerprint those modules, and this only reads.)"""
    def length(conversation: Conversation) -> int:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    start = head_length(record.messages)  # the task head's in-context example is not a turn
    return [length(record.messages[:i]) > budget
            for i, m in enumerate(record.messages) if i >= start and m["role"] == "assistant"]


def window(episodes: list[str], model: str = "hpl-tiny", max_context: int = 2048,
           max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, list[int]]:
    """How many agent turns of finished evaluations had a prompt longer than the context budget (``max_context`` −
    ``max_new_tokens``, as ``run`` cuts it), so the oldest turns were dropped; per task group and in all.

    Args:
        episodes: episodes.jsonl files written by ``run``.
        model: the policy's tokenizer (its chat template counts the tokens).
        max_context: the ``run``'s context in tokens.
        max_new_tokens: the ``run``'s new tokens per turn.
    """
    tokenizer = load_tokenizer(model)
    budget = max_context - max_new_tokens
    counts: dict[str, list[int]] = {}  # group -> [turns, turns cut]
    for path in episodes:
        for record in read_episodes(Path(path)):
            cut = cut_turns(record, tokenizer, budget)
            for group in (record.group, "all"):
                n = counts.setdefault(group, [0, 0])
                n[0], n[1] = n[0] + len(cut), n[1] + sum(cut)
    print(f"turns whose prompt passed {budget} tokens ({max_context} - {max_new_tokens}), old turns dropped:")
    for group, (turns, cut) in sorted(counts.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        print(f"  {group}: {cut} of {turns} ({100 * cut / turns if turns else 0:.1f}%)")
    return counts


def main(args: list[str] | None = None) -> None:
    """``hpl-evaluate``: a bad path or a reused output directory is one line (status 2), a failed evaluation
    (backend down, nothing scored) one line with the reason (status 1)."""
    with one_line_errors(FileNotFoundError):
        try:
            CLI([run, replay, gold, window], as_positional=False, parser_class=ShortErrorParser, args=args)
        except (EvaluationAborted, ReplayStopped) as e:  # finished work is saved; the message says how to resume
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
