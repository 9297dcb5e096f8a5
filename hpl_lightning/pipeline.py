"""HPL's data pipeline as one command: expert trajectories in, a validated preference JSONL for ``train.py`` out.

    python -m hpl_lightning.pipeline import  --input ../shared/data/intercode_sql/gpt-3.5_react_10_turns.json --output experts.jsonl
    python -m hpl_lightning.pipeline segment --input experts.jsonl --output segmented.jsonl --segmenter fixed_k
    python -m hpl_lightning.pipeline explore --experts segmented.jsonl --output rollouts.jsonl --benchmark intercode_sql
    python -m hpl_lightning.pipeline pairs   --experts segmented.jsonl --rollouts rollouts.jsonl --output pairs.jsonl
    python -m hpl_lightning.pipeline stats   --input experts.jsonl
    python train.py fit --data.train_path pairs.jsonl ...

Every subcommand takes ``--config FILE.yaml`` (see ``configs/pipeline-*.yaml``) and ``--print_config``. ``explore``
is resumable: run it again after a crash or Ctrl-C and it continues where it stopped.
"""

from __future__ import annotations

import bisect
import copy
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from hpl_lightning.envs.base import Environment, Task
from hpl_lightning.envs.pool import EnvPool
from hpl_lightning.evaluation import BENCHMARKS
from hpl_lightning.explore import (
    ExploreConfig,
    Explorer,
    count_plans,
    format_timer,
    output_lock,
    plans,
    read_rollouts,
)
from hpl_lightning.logprobs import final_hidden_states, token_entropies
from hpl_lightning.pairs import PairFilters, build_pairs
from hpl_lightning.policies import LocalPolicy, OpenAIPolicy, Policy
from hpl_lightning.schema import (
    DataError,
    Trajectory,
    UsageError,
    exit_2_on_bad_input,
    head_length,
    load_records,
    parse_record,
    to_json,
    write_jsonl,
)
from hpl_lightning.segmentation import (
    DEFAULT_STATS_SEGMENTERS,
    InvalidCover,
    LLMSegmenter,
    action_indices,
    build_segmenter,
    format_stats,
    segment_stats,
    validate_cover,
)
from hpl_lightning.tokenization import ChatTokenizer, truncate_history


def load_trajectories(path: str) -> list[Trajectory]:
    out = [r for r, _ in load_records(path) if isinstance(r, Trajectory)]
    if not out:
        raise DataError(path, None, None, "no trajectory records")
    return out


# ------------------------------------------------------------------------------------------------ import
def import_(output: str, input: str | None = None, source: str = "intercode", success_only: bool = True,
            task: str = "agent", limit: int | None = None, split: str = "train", splits: str | None = None,
            workers: int = 1) -> int:
    """Converts existing data to trajectory records (see ``hpl_lightning.importers``), or plays ScienceWorld's gold
    paths into expert trajectories (``source: sciworld_gold``, resumable; see ``sciworld.gold_experts``).

    Args:
        output: trajectory JSONL to write.
        input: the file to convert (not for sciworld_gold).
        source: intercode (InterCode's recorded results), sharegpt (ETO/IPR), conversations (role/content) or
            sciworld_gold.
        success_only: intercode: keep only episodes with reward 1 (expert data).
        task: sharegpt/conversations: task name of the records.
        limit: keep only the first N trajectories (a small subset for a quick run).
        split: sciworld_gold: train, dev or test.
        splits: sciworld_gold: a splits.json other than the shared one (e.g. a hand-picked subset).
        workers: sciworld_gold: simulators in parallel.
    """
    from hpl_lightning import importers

    if source == "sciworld_gold":
        from hpl_lightning.envs.sciworld import DEFAULT_SPLITS, gold_experts

        result = gold_experts(split, output, limit, workers, splits or str(DEFAULT_SPLITS))
        return result["written"] + result["skipped"]
    if input is None:
        raise ValueError(f"source {source!r} needs --input")
    if source == "intercode":
        importers.intercode(input, output, success_only=success_only)
    elif source in ("sharegpt", "conversations"):
        getattr(importers, source)(input, output, task=task)
    else:
        raise ValueError(f"unknown source {source!r}; expected intercode, sharegpt or conversations")
    records = [to_json(t) for t in load_trajectories(output)]
    if limit is not None:
        write_jsonl(output, records[:limit])
        print(f"kept the first {min(limit, len(records))} of {len(records)}")
    return min(len(records), limit if limit is not None else len(records))


# ------------------------------------------------------------------------------------------------ segment
@torch.no_grad()
def action_entropies(policy: LocalPolicy, trajectory: Trajectory, max_length: int = 4096) -> list[float]:
    """Mean next-token entropy of π_ref over each action's tokens given what precedes it (the uncertainty segmenter's
    input).

    A conversation longer than ``max_length`` tokens is read in windows of at most ``max_length``: each holds the
    task statement, the most recent whole turns before its first action that fit in half of ``max_length`` (history
    cut as in training and evaluation, :func:`~hpl_lightning.tokenization.truncate_history`), then as many actions
    as fit, so every action sees the task and at least the turns just before it; a conversation that fits is one
    window (the whole of it). An action that does not fit in a window with the task statement alone is an error
    naming the trajectory (its entropy would be made up)."""
    chat = ChatTokenizer(policy.tokenizer, max_length)
    messages = trajectory.messages
    at, head = action_indices(messages), head_length(messages)

    def n_tokens(msgs: list[dict[str, str]]) -> int:
        return len(policy.tokenizer(chat.render(msgs), add_special_tokens=False)["input_ids"])

    out: list[float] = []
    while len(out) < len(at):
        k = len(out)
        history = truncate_history(messages[: at[k]], head, lambda m: n_tokens(m) <= max_length // 2)
        if n_tokens(history + messages[at[k]: at[k] + 1]) > max_length:
            raise ValueError(
                f"trajectory {trajectory.id!r}: action {k} does not fit in max_length={max_length} tokens with the "
                "task statement; raise --max_length to compute its entropy"
            )
        last = bisect.bisect_right(  # the last action that fits in this window
            range(k, len(at)), max_length, key=lambda j: n_tokens(history + messages[at[k]: at[j] + 1])
        ) + k - 1
        window = history + messages[at[k]: at[last] + 1]
        out += _window_entropies(policy, chat, window, len(history))
    return out


def _window_entropies(policy: LocalPolicy, chat: ChatTokenizer, messages: list[dict[str, str]],
                      first: int) -> list[float]:
    """Mean next-token entropy over the tokens of each assistant message from index ``first`` on, in one forward."""
    text = chat.render(messages)
    spans = [(len(chat.render(messages[:i], add_generation_prompt=True)), len(chat.render(messages[: i + 1])))
             for i in range(first, len(messages)) if messages[i]["role"] == "assistant"]
    enc = policy.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    hidden = final_hidden_states(policy.model, input_ids=torch.tensor([enc["input_ids"]], device=policy.device))[0]
    # the entropy of the distribution predicting token j comes from the hidden state at j - 1
    positions = [[j - 1 for j, (start, _) in enumerate(enc["offset_mapping"]) if a <= start < b] for a, b in spans]
    return [float(token_entropies(policy.model, hidden[p]).mean()) for p in positions]


def segment(
    input: str,
    output: str,
    segmenter: str = "fixed_k",
    options: dict[str, Any] | None = None,
    reference: str | None = None,
    max_length: int = 4096,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict[str, Any]:
    """Cuts each expert trajectory into action groups, stored as ``meta.groups`` (inclusive [start, end] action
    ranges) with ``meta.segmenter``; every cover is validated.

    Args:
        input: expert trajectory JSONL.
        output: the same trajectories with their groups.
        segmenter: fixed_n, fixed_k, uncertainty, semantic_llm, semantic_embedding, jaccard or subgoal (an oracle:
            ScienceWorld's sub-goals, from the simulator's scores that gold experts record).
        options: the segmenter's config fields, e.g. {"group_size": 3} or {"threshold": 0.5}.
        reference: uncertainty only: π_ref, the SFT policy (hub name, directory or .ckpt), whose per-action
            entropies are computed when a trajectory has no ``meta.action_entropies`` yet (they are stored there);
            required then, since entropies of any other model would cut at the wrong places.
        max_length: uncertainty only: tokens of context per trajectory.
        dtype: uncertainty only: reference model weights.
        device: uncertainty only: cpu or cuda.
    """
    try:
        cutter = build_segmenter(segmenter, options)
    except ValueError as e:  # before reading any data or loading the reference
        raise UsageError(f"--segmenter/--options: {e}") from None
    trajectories = load_trajectories(input)
    if segmenter == "uncertainty":
        key = (options or {}).get("meta_key", "action_entropies")
        missing = [t for t in trajectories if key not in t.meta]
        if missing and reference is None:
            raise ValueError(
                f"segmenter uncertainty: {len(missing)} trajectories (e.g. {missing[0].id!r}) have no "
                f"meta.{key}; pass --reference (the SFT policy, π_ref) to compute them"
            )
        if missing:
            ref = LocalPolicy(reference, dtype=dtype, device=device)
            entropies = {t.id: action_entropies(ref, t, max_length) for t in missing}
            trajectories = [replace(t, meta={**t.meta, key: entropies[t.id]}) if t.id in entropies else t
                            for t in trajectories]
    covers = cutter.segment_many(trajectories)
    records = []
    for t, cover in zip(trajectories, covers):
        validate_cover(cover, len(action_indices(t.messages)))
        meta = {**t.meta, "groups": [[int(s), int(e)] for s, e in cover], "segmenter": segmenter}
        records.append(to_json(replace(t, meta=meta)))
    write_jsonl(output, records)
    lengths = [e - s + 1 for c in covers for s, e in c]
    print(f"{len(records)} trajectories, {len(lengths)} groups (mean length {sum(lengths) / len(lengths):.2f}) "
          f"by {segmenter} -> {output}")
    result: dict[str, Any] = {"trajectories": len(records), "groups": len(lengths)}
    if isinstance(cutter, LLMSegmenter):  # how much of the segmentation is the model's, not a repair or fixed-K
        print(f"{segmenter}: {cutter.stats.summary(cutter.config.fallback)}")
        result["llm"] = asdict(cutter.stats)
    return result


# ------------------------------------------------------------------------------------------------ explore
def check_explorable(path: str, experts: Sequence[tuple[Trajectory, int]], benchmark: str, levels: Sequence[str],
                     env_kwargs: dict[str, Any]) -> None:
    """Before any environment or model starts: every expert's id names a task of ``benchmark`` (as
    :func:`task_resolver` reads it) and, for the group level, its ``meta.groups`` cover its actions exactly."""
    if benchmark == "intercode_sql":
        from hpl_lightning.envs.intercode_sql import DEFAULT_DATA_DIR

        tasks_file = Path(env_kwargs.get("data_dir", DEFAULT_DATA_DIR)) / "ic_spider_dev.json"
        n_tasks = len(json.loads(tasks_file.read_text()))
    elif benchmark == "sciworld":
        from hpl_lightning.envs.sciworld import DEFAULT_SPLITS, SciWorldSplits, parse_task_id

        task_names = SciWorldSplits.load(env_kwargs.get("splits", DEFAULT_SPLITS)).max_steps
    for t, line in experts:
        if benchmark == "intercode_sql":
            prefix, _, index = t.id.rpartition("/")
            if prefix != benchmark or not index.isdigit() or int(index) >= n_tasks:
                raise DataError(path, line, "id", f"{t.id!r} is not an InterCode-SQL task: expected "
                                                  f"'{benchmark}/<index>' with index 0..{n_tasks - 1}")
        elif benchmark == "sciworld":
            try:
                name, _ = parse_task_id(t.id)
            except ValueError as e:
                raise DataError(path, line, "id", str(e)) from None
            if name not in task_names:
                raise DataError(path, line, "id", f"unknown ScienceWorld task {name!r}")
        if "group" in levels:
            groups = t.meta.get("groups")
            if groups is None:
                raise DataError(path, line, "meta.groups", "missing: run `pipeline segment` first")
            try:
                if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
                    raise InvalidCover("malformed", f"expected a list of [start, end] ranges, got {groups!r:.80}")
                validate_cover(groups, len(action_indices(t.messages)))
            except InvalidCover as e:
                raise DataError(path, line, "meta.groups", str(e)) from None


def task_resolver(benchmark: str, env: Environment) -> Callable[[Trajectory], Task]:
    """Maps an expert trajectory's id to the environment's task (intercode_sql/<index>, sciworld/<task>/<var>)."""
    if benchmark == "intercode_sql":
        return lambda t: env.task(int(t.id.rsplit("/", 1)[1]))  # type: ignore[attr-defined]
    if benchmark == "sciworld":
        from hpl_lightning.envs.sciworld import parse_task_id

        return lambda t: env.task(*parse_task_id(t.id))  # type: ignore[attr-defined]
    raise ValueError(f"unknown benchmark {benchmark!r}; expected intercode_sql or sciworld")


def make_policies(policy: str, base_url: str | None, max_new_tokens: int, temperature: float, batch_size: int,
                  threads: int | None, seed: int, dtype: str, device: str) -> dict[bool, Policy]:
    """A greedy and a sampling policy sharing one model (``False``: greedy, ``True``: ``temperature``)."""
    greedy: Policy
    if base_url is not None:
        greedy = OpenAIPolicy(policy, base_url=base_url, max_tokens=max_new_tokens, seed=seed)
    else:
        greedy = LocalPolicy(policy, max_new_tokens=max_new_tokens, batch_size=batch_size, threads=threads,
                             seed=seed, dtype=dtype, device=device)
    sampler = copy.copy(greedy)  # shares the weights; Policy has no per-call temperature
    sampler.temperature = temperature  # type: ignore[attr-defined]
    return {False: greedy, True: sampler}


def explore(
    experts: str,
    output: str,
    benchmark: str = "intercode_sql",
    exploration: ExploreConfig = ExploreConfig(),
    policy: str = "hpl-tiny",
    base_url: str | None = None,
    envs: int = 4,
    limit: int | None = None,
    task_ids: list[str] | None = None,
    max_new_tokens: int = 512,
    temperature: float = 1.0,
    batch_size: int = 16,
    threads: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    db_url: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Rollouts from the expert trajectories (segmented, for the group level) with MC estimates, appended to
    ``output`` as they finish; a re-run skips finished rollouts. Prints where the time went.

    Args:
        experts: segmented expert trajectories (``pipeline segment``).
        output: rollout JSONL (appended to; resumed from).
        benchmark: intercode_sql or sciworld.
        exploration: levels, M, negatives, step stride, action cap (see ``ExploreConfig``).
        policy: π_ref: a .ckpt, a model directory or hub name, hpl-tiny; with ``base_url`` the served model's name.
        base_url: an OpenAI-compatible endpoint (e.g. vLLM) instead of a local model.
        envs: environments = rollouts in flight = the model's batch per turn.
        limit: only the first N expert trajectories.
        task_ids: only these expert trajectory ids.
        max_new_tokens: per agent turn (paper: 512).
        temperature: of the sampled rollouts (paper: 1.0); trajectory-level rollouts are greedy.
        batch_size: largest generate() batch of a local model.
        threads: torch CPU threads while generating.
        seed: sampling seed (and the initialisation of config-only models such as hpl-tiny).
        dtype: local model weights.
        device: cpu or cuda.
        db_url: intercode_sql server; default: start (or reuse) the local one with scripts/start_mysql.sh.
        env_kwargs: more environment options; sciworld defaults to ``step_budget: false`` (expert prefixes are
            longer than ETO's budgets), so set ``exploration.max_actions``.
        progress: show progress bars.
    """
    if benchmark not in BENCHMARKS:
        raise UsageError(f"--benchmark: unknown benchmark {benchmark!r}; expected one of {sorted(BENCHMARKS)}")
    found = [(t, line) for t, line in load_records(experts) if isinstance(t, Trajectory)]
    if task_ids is not None:
        found = [(t, line) for t, line in found if t.id in set(task_ids)]
    found = found[:limit]
    kwargs = dict(env_kwargs or {})
    check_explorable(experts, found, benchmark, exploration.levels, kwargs)
    trajectories = [t for t, _ in found]
    path = Path(output)
    with output_lock(path):  # one writer per output; taken before any environment or model starts
        if benchmark == "intercode_sql" and "db_url" not in kwargs:
            from hpl_lightning.envs.intercode_replay import start_server

            kwargs["db_url"] = db_url or start_server()
        if benchmark == "sciworld":
            kwargs.setdefault("step_budget", False)
        policies = make_policies(policy, base_url, max_new_tokens, temperature, batch_size, threads, seed, dtype,
                                 device)
        spec = BENCHMARKS[benchmark]
        with EnvPool(lambda: spec.make_env(**kwargs), envs) as pool:
            explorer = Explorer(pool, policies, path, exploration, progress)
            resolve = task_resolver(benchmark, pool.envs[0])
            # before any episode: sciworld's task() loads a variation
            tasks = {t.id: resolve(t) for t in trajectories}
            total = count_plans(trajectories, exploration)
            print(f"{benchmark}: {len(trajectories)} expert trajectories, {total} plans, {explorer.resumed} rollouts "
                  f"already in {path}, {pool.size} environment(s)")
            summary = explorer.run(plans(trajectories, lambda t: tasks[t.id], exploration), total)
    print(format_timer(summary))
    return summary


# ------------------------------------------------------------------------------------------------ pairs
def pairs(
    experts: str,
    rollouts: str,
    output: str,
    filters: PairFilters = PairFilters(),
    levels: list[str] = ["trajectory", "step", "group"],
    max_negatives: int = 3,
    with_experts: bool = True,
) -> dict[str, Any]:
    """Builds trajectory, step and group pairs from experts and rollouts with the paper's filters; prints how many
    candidates each filter dropped; every written record is validated with the data contract's parser.

    Args:
        experts: the segmented expert trajectories explored.
        rollouts: the rollout JSONL of ``explore``.
        output: preference JSONL for ``train.py``.
        filters: thresholds (defaults: the paper's).
        levels: which levels to build.
        max_negatives: negatives per group (as explored).
        with_experts: also write the expert trajectories (default): the behaviour-cloning data of the paper's
            L_BC (Eq. 1) in the same file; false writes the pairs only.
    """
    if not Path(rollouts).is_file():
        raise DataError(rollouts, None, "--rollouts", "file not found")
    trajectories = load_trajectories(experts)
    found = list(read_rollouts(Path(rollouts)).values())
    built, report = build_pairs(trajectories, found, filters, levels, max_negatives)
    records = [to_json(p) for p in built] + ([to_json(t) for t in trajectories] if with_experts else [])
    for i, record in enumerate(records, start=1):
        parse_record(json.loads(json.dumps(record)), output, i)  # what train.py will read back
    write_jsonl(output, records)
    print(report.summary())
    print(f"{len(built)} pairs{' and %d expert trajectories' % len(trajectories) if with_experts else ''} -> {output}")
    return {"pairs": dict(report.kept), "candidates": dict(report.candidates),
            "dropped": {k: dict(v) for k, v in report.dropped.items()}}


# ------------------------------------------------------------------------------------------------ stats
def stats(
    input: str,
    segmenters: list[str] = list(DEFAULT_STATS_SEGMENTERS),
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Group statistics (groups per trajectory, group length histogram) of each segmenter on a trajectory JSONL.

    Args:
        input: trajectory JSONL.
        segmenters: segmenter names.
        options: config fields per segmenter, e.g. {"jaccard": {"threshold": 0.3}}.
    """
    for name in segmenters:  # unknown names and options before any data is read
        try:
            build_segmenter(name, (options or {}).get(name))
        except ValueError as e:
            raise UsageError(f"--segmenters/--options: {e}") from None
    result = segment_stats(input, segmenters, options)
    print(format_stats(result))
    return result


def main(args: Sequence[str] | None = None) -> Any:
    """Runs a subcommand and returns its result (for in-process callers and tests)."""
    from jsonargparse import CLI

    from hpl_lightning.console import ShortErrorParser

    with exit_2_on_bad_input():
        return CLI({"import": import_, "segment": segment, "explore": explore, "pairs": pairs, "stats": stats},
                   args=args, as_positional=False, parser_class=ShortErrorParser)


def console_main() -> None:
    """``hpl-pipeline``: ``main`` without its return value (a console script would print it as an exit status)."""
    main()


if __name__ == "__main__":
    console_main()
