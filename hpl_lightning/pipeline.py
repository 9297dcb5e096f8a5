"""HPL's data pipeline as one command: expert trajectories in, a validated preference JSONL for ``train.py`` out.

    python -m hpl_lightning.pipeline import  --input ../shared/data/intercode_sql/gpt-3.5_react_10_turns.json --output experts.jsonl
    python -m hpl_lightning.pipeline segment --input experts.jsonl --output segmented.jsonl --segmenter fixed_k
    python -m hpl_lightning.pipeline explore --experts segmented.jsonl --output rollouts.jsonl --benchmark intercode_sql
    python -m hpl_lightning.pipeline pairs   --experts segmented.jsonl --rollouts rollouts.jsonl --output pairs.jsonl
    python -m hpl_lightning.pipeline stats   --input experts.jsonl
    python -m hpl_lightning.pipeline segment-quality --benchmark sciworld --split dev --limit 10
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
from typing import Any, Callable, Literal, Sequence

import torch

from hpl_lightning.envs.base import Environment, Task
from hpl_lightning.envs.pool import EnvPool
from hpl_lightning.errors import DataError, UsageError
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
from hpl_lightning.pairs import PairFilters, build_pairs, expert_actions
from hpl_lightning.policies import MAX_NEW_TOKENS, LocalPolicy, OpenAIPolicy, Policy
from hpl_lightning.prefix_cache import DEFAULT_ENGINE, Engine, local_policy
from hpl_lightning.schema import Trajectory, head_length, load_records, parse_record, to_json, write_jsonl
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
def import_(output: str, input: str | list[str] | None = None, source: str = "intercode", success_only: bool = True,
            task: str = "agent", limit: int | None = None, split: str = "train", splits: str | None = None,
            workers: int = 1, benchmark: str | None = None, level: Literal["trajectory", "step", "group"] | None = None,
            group_chosen: Literal["group", "whole"] = "group") -> int:
    """Converts existing data to trajectory records (see ``hpl_lightning.importers``), the authors' released pairs
    to preference records (``source: hpl_release``), or plays ScienceWorld's gold paths into expert trajectories
    (``source: sciworld_gold``, resumable; see ``sciworld.gold_experts``).

    Args:
        output: JSONL to write.
        input: the file to convert (not for sciworld_gold); hpl_release: one or more pair files of the release (its
            trajectory, step and group pairs, its curriculum phase_K_data.json files).
        source: intercode (InterCode's recorded results), sharegpt (ETO/IPR), conversations (role/content),
            hpl_release (the pairs of github.com/PatrickG1014/HPL) or sciworld_gold.
        success_only: intercode: keep only episodes with reward 1 (expert data).
        task: sharegpt/conversations: task name of the records.
        limit: keep only the first N records (a small subset for a quick run).
        split: sciworld_gold: train, dev or test.
        splits: sciworld_gold: a splits.json other than the shared one (e.g. a hand-picked subset).
        workers: sciworld_gold: simulators in parallel.
        benchmark: hpl_release (required): the benchmark the pairs are from (alfworld, webshop, intercode_sql...),
            the first part of every task id.
        level: hpl_release: the level of every pair (default: each pair's own, from the file's kind).
        group_chosen: hpl_release: a group pair's chosen side cut after its group_length-th action (group, the
            paper's G_w) or kept as the release wrote it (whole).
    """
    from hpl_lightning import importers

    if source == "sciworld_gold":
        from hpl_lightning.envs.sciworld import DEFAULT_SPLITS, gold_experts

        result = gold_experts(split, output, limit, workers, splits or str(DEFAULT_SPLITS))
        return result["written"] + result["skipped"]
    if input is None:
        raise UsageError(f"source {source!r} needs --input")
    if source == "hpl_release":
        if not benchmark:
            raise UsageError("source hpl_release needs --benchmark (the release's files do not name it)")
        return importers.hpl_release(input, output, benchmark, level, group_chosen, limit)
    if not isinstance(input, str):
        raise UsageError(f"source {source!r} takes one --input file")
    if source == "intercode":
        importers.intercode(input, output, success_only=success_only)
    elif source in ("sharegpt", "conversations"):
        getattr(importers, source)(input, output, task=task)
    else:
        raise UsageError(f"unknown source {source!r}; expected intercode, sharegpt, conversations, hpl_release or "
                         "sciworld_gold")
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
            raise UsageError(
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
    raise UsageError(f"unknown benchmark {benchmark!r}; expected intercode_sql or sciworld")


def make_policies(policy: str, base_url: str | None, max_new_tokens: int, temperature: float, batch_size: int,
                  threads: int | None, seed: int, dtype: str, device: str, engine: Engine = DEFAULT_ENGINE,
                  max_context: int | None = None) -> dict[bool, Policy]:
    """A greedy and a sampling policy sharing one model (``False``: greedy, ``True``: ``temperature``)."""
    greedy: Policy
    if base_url is not None:
        greedy = OpenAIPolicy(policy, base_url=base_url, max_tokens=max_new_tokens, seed=seed)
    else:
        greedy = local_policy(policy, engine, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              threads=threads, seed=seed, dtype=dtype, device=device, max_context=max_context)
    sampler = copy.copy(greedy)  # shares the weights (and nothing it changes); Policy has no per-call temperature
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
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = 1.0,
    batch_size: int = 16,
    threads: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    db_url: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    engine: Engine = DEFAULT_ENGINE,
    max_context: int | None = None,
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
        max_new_tokens: per agent turn (the paper allows 512).
        temperature: of the sampled rollouts (1.0: the paper, and the release's run_mc_sample.sh, run_negative.sh,
            run_negative_mc.sh); trajectory-level rollouts are greedy (the release's generate_trajectory.py).
        batch_size: largest generate() batch of a local model (``recompute`` engine).
        threads: torch CPU threads while generating.
        seed: sampling seed (and the initialisation of config-only models such as hpl-tiny).
        dtype: local model weights.
        device: cpu or cuda.
        db_url: intercode_sql server; default: start (or reuse) the local one with scripts/start_mysql.sh.
        env_kwargs: more environment options; sciworld defaults to ``step_budget: false`` (expert prefixes are
            longer than ETO's budgets), so set ``exploration.max_actions``.
        progress: show progress bars.
        engine: how a local model computes a turn (``prefix_cache.Engine``): ``prefix-cache`` encodes each unique
            context token about once (a task's expert prefix once for all its samples), ``recompute`` re-encodes
            every context at every turn. Samples differ between the two (per-request vs per-batch seeds).
        max_context: a local model's window (default: the model's); the oldest turns after the task statement go
            first, as in training (``--data.max_length``: set both alike).
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
                                 device, engine, max_context)
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
    """Builds trajectory, step and group pairs from experts and rollouts with the paper's filters; prints per level
    the candidates, the sampled alternatives equal to the expert's, how many each filter dropped and the pairs kept in
    each direction; every written record is validated with the data contract's parser.

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
    return report.as_dict()


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


# ------------------------------------------------------------------------------------------------ segment-quality
QUALITY_SEGMENTERS = ("fixed_n", "fixed_k", "uncertainty", "semantic_embedding", "jaccard")


def gold_trajectories(split: str, variations: Sequence[tuple[str, int]], splits: str, experts: str | None,
                      workers: int) -> tuple[list[Trajectory], dict[str, str]]:
    """ScienceWorld gold experts (each action's score recorded) of ``variations``, in their order, and why the
    others are missing: read from ``experts`` (a ``sciworld_gold`` import), the ones not in it played now and
    appended to it (the simulator when ``experts`` is None)."""
    import tempfile

    from hpl_lightning.envs.sciworld import SciWorldSplits, gold_experts, task_id

    def read(path: str) -> dict[str, Trajectory]:
        return {t.id: t for t in load_trajectories(path)} if Path(path).is_file() else {}

    found, failed = read(experts) if experts else {}, {}
    missing = [v for v in variations if task_id(*v) not in found]
    if missing:  # played into ``experts`` (resumable) or a file of the moment
        with tempfile.TemporaryDirectory() as tmp:
            subset = Path(tmp) / "splits.json"  # the split narrowed to the missing variations, for gold_experts
            protocol = SciWorldSplits.load(splits)
            subset.write_text(json.dumps({"simplification": protocol.simplification, "max_steps": protocol.max_steps,
                                          "splits": {split: [list(v) for v in missing]}}))
            path = experts or str(Path(tmp) / "gold.jsonl")
            failed = gold_experts(split, path, workers=workers, splits=str(subset))["failed"]
            found = read(path)
    return [found[task_id(*v)] for v in variations if task_id(*v) in found], failed


def segment_quality(
    benchmark: str = "sciworld",
    split: str = "dev",
    limit: int | None = None,
    per_task: int | None = None,
    segmenters: list[str] = list(QUALITY_SEGMENTERS),
    options: dict[str, dict[str, Any]] | None = None,
    policy: str = "smollm2-135m-instruct",
    max_length: int = 4096,
    dtype: str = "float32",
    device: str = "cpu",
    experts: str | None = None,
    output_dir: str = "results/segmentation-quality",
    workers: int = 1,
    seed: int = 0,
    random_draws: int = 20,
    splits: str | None = None,
) -> dict[str, Any]:
    """Scores each segmenter's action groups on a split's gold trajectories against the reference: ScienceWorld's
    sub-goals (a cut after every action that raised the simulator's score, the ``subgoal`` segmenter). Prints the
    table and writes results.md, results.png, results.json and covers.jsonl (every trajectory's reference, covers
    and entropies) to ``output_dir``.

    Args:
        benchmark: sciworld (the only one whose score marks sub-goals).
        split: train, dev or test.
        limit: only the first N variations (after ``per_task``).
        per_task: only the first K variations of each task type (a stratified subset).
        segmenters: those to score, with a random baseline (the reference's group count, random cuts); add
            semantic_llm with its endpoint in ``options``.
        options: config fields per segmenter, e.g. {"semantic_llm": {"base_url": ..., "model": ...}}.
        policy: uncertainty: the model whose per-action entropies it cuts at (a pretrained one: never hpl-tiny).
        max_length: uncertainty: tokens per window (longer trajectories are read in windows).
        dtype: uncertainty: model weights.
        device: uncertainty: cpu or cuda.
        experts: a gold-expert JSONL to read the trajectories from (``import --source sciworld_gold``); the
            missing ones are played and appended. Default: play them all now.
        output_dir: where the report goes (the default holds the committed one: give short runs another).
        workers: simulators in parallel.
        seed: of the random baseline.
        random_draws: random covers per trajectory (pooled).
        splits: ScienceWorld's splits.json (default: the shared one).
    """
    import importlib.metadata
    import inspect
    import os
    import shlex
    import time

    import numpy as np
    from tqdm.auto import tqdm

    from hpl_lightning import segment_quality as sq
    from hpl_lightning.envs.sciworld import DEFAULT_SPLITS, SciWorldSplits, parse_task_id
    from hpl_lightning.results import machine, revision, revision_text

    defaults = {k: p.default for k, p in inspect.signature(segment_quality).parameters.items()}
    given = {k: v for k, v in locals().items() if k in defaults and v != defaults[k]}
    command = shlex.join(["hpl-pipeline", "segment-quality", *(x for k, v in given.items() for x in (
        f"--{k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v)))])
    if benchmark != "sciworld":
        raise UsageError(f"--benchmark: only sciworld has sub-goal scores, not {benchmark!r}")
    for name in segmenters:  # names and options before any simulator or model starts
        try:
            build_segmenter(name, (options or {}).get(name))
        except ValueError as e:
            raise UsageError(f"--segmenters/--options: {e}") from None
    if not segmenters or sq.RANDOM in segmenters or "subgoal" in segmenters:
        raise UsageError("--segmenters: name at least one segmenter (the random baseline and the subgoal reference "
                         "are always there)")
    splits = splits or str(DEFAULT_SPLITS)
    variations = SciWorldSplits.load(splits).variations(split)
    if per_task is not None:
        variations = sq.stratified(variations, per_task)
    variations = variations[:limit]
    load, code = os.getloadavg(), revision(Path(output_dir))  # the code that runs, whatever changes meanwhile
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    trajectories, failed = gold_trajectories(split, variations, splits, experts, workers)
    seconds["gold paths"] = time.perf_counter() - t0
    reference = build_segmenter("subgoal").segment_many(trajectories)
    covers: dict[str, list[list[tuple[int, int]]]] = {}
    entropies: dict[str, list[float]] = {}
    for name in segmenters:
        t = time.perf_counter()
        inputs = {}
        if name == "uncertainty":
            ref = LocalPolicy(policy, dtype=dtype, device=device)
            for tr in tqdm(trajectories, desc=f"entropies ({policy})", unit="trajectory"):
                entropies[tr.id] = action_entropies(ref, tr, max_length)
            inputs["entropies"] = entropies
            del ref
        cutter = build_segmenter(name, (options or {}).get(name), **inputs)
        covers[name] = cutter.segment_many(trajectories)
        for tr, cover in zip(trajectories, covers[name]):
            validate_cover(cover, len(action_indices(tr.messages)))
        seconds[name] = time.perf_counter() - t
        if isinstance(cutter, LLMSegmenter):
            print(f"{name}: {cutter.stats.summary(cutter.config.fallback)}")
    golds = [sq.Gold(tr.id, parse_task_id(tr.id)[0], expert_actions(tr), tr.meta["start_score"], tr.meta["scores"],
                     cover) for tr, cover in zip(trajectories, reference)]
    counts, randoms = sq.count(golds, covers, seed, random_draws)
    result = sq.table(counts)
    examples = [ex for name in segmenters if (ex := sq.worst_example(name, golds, covers[name])) is not None]
    wall = time.perf_counter() - t0
    per_trajectory = [
        {"id": g.id, "start_score": g.start_score, "scores": g.scores, "reference": g.reference,
         "covers": {name: covers[name][i] for name in segmenters}, sq.RANDOM: randoms[g.id][0],
         **({"entropies": [round(h, 4) for h in entropies[g.id]]} if g.id in entropies else {})}
        for i, g in enumerate(golds)]
    actions = [len(g.commands) for g in golds]
    chosen = [f"the first {per_task} variations of each task type"] if per_task else []
    chosen += [f"the first {limit}{' of those' if per_task else ' variations'}"] if limit else []
    notes = [
        f"Gold trajectories of ScienceWorld's {split} split ({'; '.join(chosen) or 'every variation'}): "
        f"{len(golds)} of {len(variations)} played to score 100, {len({g.task_type for g in golds})} task types, "
        f"{sum(actions)} actions ({min(actions)}-{max(actions)} per trajectory, mean {np.mean(actions):.1f}). The "
        "reference cuts after every action that raised the simulator's score (the `subgoal` segmenter, an oracle). "
        f"Boundary P/R/F1 pooled over trajectories; `random` cuts at random with the reference's group count "
        f"({random_draws} draws per trajectory, seed {seed}).",
        *([f"Not scored (the gold path did not reach 100, or crashed): "
           f"{', '.join(f'`{k}` ({v})' for k, v in failed.items())}."] if failed else []),
    ]
    provenance = {
        "command": f"`{command}`", "commit": f"`{revision_text(code)}`", "machine": machine(),
        "load average (1/5/15 min) at the start": " / ".join(f"{x:.1f}" for x in load),
        "load average at the end": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "wall time": f"{wall:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")",
        "segmenter options": f"`{json.dumps(options or {})}` (defaults otherwise)",
        "uncertainty": (f"entropies of `{policy}` ({dtype}, windows of {max_length} tokens); ε = the percentile of "
                        "all entropies of the trajectories scored" if "uncertainty" in segmenters else "-"),
        "environment": f"ScienceWorld {importlib.metadata.version('scienceworld')} through hpl_lightning/envs/"
                       "sciworld.py of that commit",
    }
    title = f"Segmentation quality against ScienceWorld's sub-goals ({split})"
    text = sq.write_report(Path(output_dir), title, result, notes, examples, provenance, per_trajectory)
    print(text)
    print(f"report -> {Path(output_dir) / 'results.md'}")
    return {"table": result, "trajectories": len(trajectories), "failed": failed, "seconds": seconds, "wall": wall}


def main(args: Sequence[str] | None = None) -> Any:
    """Runs a subcommand and returns its result (for in-process callers and tests)."""
    from jsonargparse import CLI

    from hpl_lightning.console import ShortErrorParser, one_line_errors

    with one_line_errors():
        return CLI({"import": import_, "segment": segment, "explore": explore, "pairs": pairs, "stats": stats,
                    "segment-quality": segment_quality},
                   args=args, as_positional=False, parser_class=ShortErrorParser)


def console_main() -> None:
    """``hpl-pipeline``: ``main`` without its return value (a console script would print it as an exit status)."""
    main()


if __name__ == "__main__":
    console_main()
