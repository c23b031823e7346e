"""The replay scoring rules as a plain Python loop: the specification ``ReplayEnvironment`` must match.

Used by the tests (property: both give the same score and cost for any plan) and by the benchmark as the
baseline the vectorised scorer is measured against.
"""

from __future__ import annotations

from collections import Counter

from executors.replay import ReplayEnvironment, answer_at_cap, tie_priority
from graphs.cost import decode_flops
from graphs.plan import Plan

__all__ = ["reference_score"]


def reference_score(env: ReplayEnvironment, plan: Plan) -> tuple[float, float]:
    """(mean score over orderings, mean decode FLOPs per problem) by looping over every draw."""
    env.check(plan)
    stage = plan.stages[0]
    data = env.data
    problems = data.problems
    total_correct, total_flops = 0.0, 0.0
    for r in range(env.orderings):
        for p, problem in enumerate(problems):
            streams = []
            used: dict[str, int] = {}
            for node in stage.nodes:
                rec = data.records[node.model]
                start = used.get(node.model, 0)
                used[node.model] = start + node.n
                order = env.ordering(node.model)[r, p, start : start + node.n]
                draws = []
                for index in order:
                    answer, tokens = answer_at_cap(
                        rec.answers[p][index], rec.tokens[p][index], rec.probes[p][index], node.max_tokens, rec.probe_every
                    )
                    prompt = float(env._prompt_tokens[p])
                    draws.append((answer, decode_flops(data.specs[node.model], prompt, float(tokens))))
                streams.append(draws)
            sequence = []
            longest = max(len(s) for s in streams)
            for j in range(longest):
                sequence.extend(s[j] for s in streams if j < len(s))
            votes: Counter[str] = Counter()
            decided = None
            for answer, flops in sequence:
                total_flops += flops
                if answer is None:
                    continue
                votes[answer] += 1
                if stage.early_stop is not None and votes[answer] >= stage.early_stop:
                    decided = answer
                    break
            if decided is None and votes:
                decided = max(votes, key=lambda a: votes[a] + tie_priority(env.seed, r, problem.id, a))
            gold = env._golds[p]
            total_correct += float(decided is not None and decided == gold)
    runs = env.orderings * len(problems)
    return total_correct / runs, total_flops / runs
