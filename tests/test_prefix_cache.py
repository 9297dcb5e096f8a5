"""PrefixCachePolicy (issue 21): continuing each episode from its cache, with shared prefixes encoded once and all
episodes in one batch, writes the greedy text the recompute path writes, turn after turn, through window overflow,
stop strings and episodes that end at different turns; a task's Monte-Carlo samples encode its prefix once; and a
sample depends on its key, not on its batch."""

from __future__ import annotations

import torch

from hpl_lightning.policies import LocalPolicy
from hpl_lightning.prefix_cache import CachedContext, ContextPool, PrefixCachePolicy, local_policy, shared_prefixes
from tests.test_local_policy import HEAD, force_next_token

BUDGETS = [2, 5, 3, 6]  # turns per episode: they leave the batch at different turns


def varied(policy: LocalPolicy) -> LocalPolicy:
    """``policy`` with large random weights: untrained hpl-tiny greedily writes only newlines, which any path
    would match; these weights write varied text, so a wrong context changes it."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in policy.model.parameters():
            if weight.dim() >= 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return policy


def start(episode: int) -> list[dict[str, str]]:
    """Episodes share the instruction, not the task (of different lengths)."""
    return HEAD[:2] + [{"role": "user", "content": f"Task {episode}: boil the water" + " now" * (5 * episode)}]


def run_episodes(policies: list[LocalPolicy]) -> tuple[list[list[str]], int, int]:
    """Runs the episodes of ``BUDGETS`` in lock step with every policy; returns each turn's texts (the first
    policy's, after asserting all agree), the prompt tokens a full recomputation feeds and how many prompts the
    window cut."""
    episodes = {i: start(i) for i in range(len(BUDGETS))}
    turns, recomputed, cut = [], 0, 0
    tokenizer = policies[0].tokenizer
    for turn in range(max(BUDGETS)):
        active = [i for i in episodes if turn < BUDGETS[i]]
        conversations = [episodes[i] for i in active]
        texts = [p.generate(conversations) for p in policies]
        assert all(t == texts[0] for t in texts[1:]), f"turn {turn}: {texts}"
        recomputed += sum(len(policies[0].prompt_ids(c)) for c in conversations)
        cut += sum(len(policies[0].prompt_ids(c)) < len(tokenizer.apply_chat_template(c, add_generation_prompt=True)
                                                         ["input_ids"]) for c in conversations)
        turns.append(texts[0])
        for i, text in zip(active, texts[0]):
            observation = f"Observation: obs{turn} " + "water " * (3 + 4 * ((i + turn) % 3))
            episodes[i] += [{"role": "assistant", "content": text}, {"role": "user", "content": observation}]
    return turns, recomputed, cut


def test_episodes_write_what_recomputing_writes_and_each_token_is_encoded_about_once():
    kwargs = dict(max_context=260, max_new_tokens=12)
    cached, recompute = varied(PrefixCachePolicy("hpl-tiny", **kwargs)), varied(LocalPolicy("hpl-tiny", **kwargs))
    turns, recomputed, cut = run_episodes([cached, recompute])
    assert all(t.strip() for texts in turns for t in texts)  # the model writes something to compare
    assert cut >= 3  # the window overflowed: old turns were dropped
    assert cached.prefilled < recomputed / 2  # recomputation feeds each context again at every turn


def test_a_stop_string_the_model_writes_cuts_the_turn_on_both_paths():
    free = varied(LocalPolicy("hpl-tiny", max_new_tokens=12)).generate([start(0)])[0]
    stop = free[3:5]  # a string the tiny model writes mid-turn
    assert stop.strip()
    kwargs = dict(max_context=260, max_new_tokens=12, stop=[stop])
    policies = [varied(PrefixCachePolicy("hpl-tiny", **kwargs)), varied(LocalPolicy("hpl-tiny", **kwargs))]
    turns, _, _ = run_episodes(policies)
    assert turns[0][0] == free[:3]


def test_a_turn_ends_at_the_end_of_turn_token():
    policy = PrefixCachePolicy("hpl-tiny", max_new_tokens=50)
    force_next_token(policy, policy.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert policy.generate([start(0), start(1)]) == ["", ""]
    assert policy.prefilled < sum(len(policy.prompt_ids(c)) for c in (start(0), start(1)))  # the head: once


def test_a_sample_depends_on_its_key_not_on_its_batch():
    conversations = [start(i) for i in range(3)] + [start(0)]
    keys = ["ep0/turn0", "ep1/turn0", "ep2/turn0", "ep3/turn0"]
    policy = varied(PrefixCachePolicy("hpl-tiny", max_new_tokens=10, temperature=1.0, seed=3))
    alone = [policy.generate([c], [k])[0] for c, k in zip(conversations, keys)]
    assert alone[0] != alone[3]  # same prompt, another key: another sample
    for order in ([0, 1, 2, 3], [2, 0], [3, 1]):
        together = policy.generate([conversations[i] for i in order], [keys[i] for i in order])
        assert together == [alone[i] for i in order]


def test_shared_prefixes_are_the_prefix_tree_of_the_prompts():
    prompts = [torch.tensor(p) for p in ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [1, 2, 3, 9, 9], [1, 2, 3, 9, 8],
                                         [1, 2, 3, 4, 5, 6])]
    assert shared_prefixes(prompts) == [[(3, [0, 4, 1, 3, 2])],  # every prompt: the instruction
                                        [(5, [0, 4, 1]), (4, [3, 2])],  # each task's prefix, under it
                                        [(6, [0, 4])]]  # identical prompts (M samples of one state): all of it
    assert shared_prefixes([torch.tensor([1, 2, 3])] * 2) == [[(3, [0, 1])]]
    # a short prompt inside a group does not stop the others from sharing more (it once did: [[(1, ...)]])
    assert shared_prefixes([torch.tensor(p) for p in ([1, 2], [1, 2, 3, 4], [1, 2, 3, 4])]) == \
        [[(2, [0, 1, 2])], [(4, [1, 2])]]
    assert shared_prefixes([torch.tensor([1, 2]), torch.tensor([5, 6])]) == []


def test_monte_carlo_samples_of_a_task_encode_its_prefix_once():
    """M samples from each of two expert prefixes (same instruction, long task-specific histories) in one call:
    every unique context token is fed about once, and each sample is what it is alone."""
    def prefix(task: int) -> list[dict[str, str]]:
        history = [m for t in range(3) for m in ({"role": "assistant", "content": f"Action: look {task} {t}"},
                                                  {"role": "user", "content": f"Observation: room {task} " * 8})]
        return start(task) + history

    samples = [(prefix(task), f"task{task}/sample{m}") for task in (1, 2) for m in range(3)]
    policy = varied(PrefixCachePolicy("hpl-tiny", max_new_tokens=8, temperature=1.0, seed=5))
    together = policy.generate([c for c, _ in samples], [k for _, k in samples])
    unique = len(policy.prompt_ids(prefix(1))) + len(policy.prompt_ids(prefix(2))) - shared_instruction(policy)
    assert policy.prefilled <= unique + len(samples)  # + the last prompt token each sample feeds itself
    assert len(set(together[:3])) > 1  # distinct samples of one prompt
    alone = varied(PrefixCachePolicy("hpl-tiny", max_new_tokens=8, temperature=1.0, seed=5))
    assert together == [alone.generate([c], [k])[0] for c, k in samples]


def shared_instruction(policy: LocalPolicy) -> int:
    """Tokens the two tasks' prompts share (the instruction)."""
    a, b = (policy.prompt_ids(start(task)) for task in (1, 2))
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def test_the_engine_is_chosen_by_name():
    assert type(local_policy("hpl-tiny", "recompute")) is LocalPolicy
    assert type(local_policy("hpl-tiny", "prefix-cache")) is PrefixCachePolicy


def test_the_context_pool_keeps_no_prefix_of_another_and_forgets_the_least_recent_first():
    def context(*ids: int) -> CachedContext:
        return CachedContext(torch.tensor(ids), [], [])

    pool = ContextPool(capacity=7)
    a, b = context(1, 2, 3), context(4, 5, 6)
    pool.update([], [a, b])
    assert pool.match(torch.tensor([1, 2, 3, 9])) == (a, 3) and pool.match(torch.tensor([1, 2])) == (a, 1)
    longer = context(1, 2, 3, 7)  # continues a: a goes
    pool.update([a], [longer, context(1, 2, 3, 7)])  # the same context twice: kept once
    assert [id(x) for x in pool.contexts] == [id(b), id(longer)]
    c = context(8, 9)
    pool.update([b], [c])  # 9 tokens > 7: the least recently used (longer) goes, not the ones just used or made
    assert [id(x) for x in pool.contexts] == [id(b), id(c)]


def test_greedy_and_sampling_policies_of_an_exploration_share_one_pool():
    from hpl_lightning.pipeline import make_policies

    policies = make_policies("hpl-tiny", None, 8, 1.0, 4, None, 0, "float32", "cpu")
    assert policies[False].pool is policies[True].pool and policies[True].temperature == 1.0
    policies[False].generate([start(1)])
    before = policies[True].prefilled
    policies[True].generate([start(1)], ["k"])  # the greedy call's context serves the sampler
    assert policies[True].prefilled - before == 1
