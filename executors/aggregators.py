"""Aggregators: how a stage turns its nodes' samples into one answer, and the prompts of non-solver roles.

- **Majority vote** (``vote``): answers are compared after ``executors.answers.normalize_answer``; the
  answer with most votes wins, ties go to the answer seen first. Failed samples never vote.
- **Early stop** (``sample_until_agreement``): samples are drawn in small batches, round-robin over the
  stage's sampling nodes, until ``k`` answers agree or every node has drawn its ``n``.
- **Best-of-n** (``best_of_n``): a verifier node scores each distinct candidate answer (``verifier_messages``;
  ``parse_score`` reads a 0-10 score from its reply); the best mean score wins, ties by votes.
- **LLM fusion** (``fusion_messages``): an aggregator node is prompted with all candidates and writes the
  stage's answer.

Reviewer and reviser nodes get their predecessors' outputs appended to the stage prompt
(``reviewer_messages``, ``reviser_messages``): an edge u -> v puts u's output into v's context.

Model output that a parser cannot read is a failed ``Sample`` (``error`` says why), never an exception.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from executors.answers import normalize_answer
from graphs.plan import Role

__all__ = [
    "ANSWER_ROLES",
    "Message",
    "Sample",
    "agreement",
    "best_of_n",
    "context_messages",
    "fusion_messages",
    "parse_score",
    "reviewer_messages",
    "reviser_messages",
    "sample_until_agreement",
    "solver_messages",
    "verifier_messages",
    "vote",
]

Message = Mapping[str, str]

ANSWER_ROLES = frozenset({Role.SOLVER, Role.REVISER, Role.AGGREGATOR})


@dataclass(frozen=True)
class Sample:
    """One generation of one node of one stage, as the plan runner recorded it.

    ``answer`` is what the stage's parser read (``None`` for reviews and verifier scores, which are not
    answers, and for failed samples); ``error`` says why a sample failed (unreadable output, a prompt
    too long for the model, a call refused by the budget).
    """

    stage: str
    node: str
    role: Role
    model: str
    index: int
    text: str
    answer: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    score: float | None = None
    """Verifier samples: the score read from the text, in [0, 1]."""

    @property
    def failed(self) -> bool:
        return self.error is not None

    @cached_property
    def key(self) -> str | None:
        """The normalised answer votes are counted on (``None``: no vote)."""
        return None if self.failed or self.answer is None else normalize_answer(self.answer)


# -- voting ----------------------------------------------------------------------------------------------


def vote(samples: Sequence[Sample]) -> Sample | None:
    """The first sample of the answer with most votes (ties: the answer seen first), or ``None``."""
    counts = Counter(s.key for s in samples if s.key is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(s for s in samples if s.key is not None and counts[s.key] == best)


def agreement(samples: Sequence[Sample], k: int) -> Sample | None:
    """The first sample of the first answer to collect ``k`` votes, in draw order, or ``None``."""
    counts: Counter[str] = Counter()
    for sample in samples:
        if sample.key is None:
            continue
        counts[sample.key] += 1
        if counts[sample.key] >= k:
            return next(s for s in samples if s.key == sample.key)
    return None


Draw = Callable[[int, int], Awaitable[Sequence[Sample]]]
"""``draw(offset, count)``: samples ``offset .. offset + count - 1`` of one node."""


async def sample_until_agreement(
    streams: Sequence[tuple[int, Draw]], k: int, *, batch: int, prior: Sequence[Sample] = ()
) -> tuple[list[Sample], bool]:
    """Draw from every ``(n, draw)`` stream in rounds of ``batch`` samples (streams of a round run
    concurrently) until ``k`` answers agree, counting ``prior`` samples too. Returns the samples drawn,
    in draw order, and whether the stage stopped before drawing everything."""
    drawn: list[Sample] = []
    taken = [0] * len(streams)
    batch = max(1, batch)
    while True:
        if agreement([*prior, *drawn], k) is not None:
            return drawn, any(t < n for t, (n, _) in zip(taken, streams, strict=True))
        todo = [(i, min(batch, n - taken[i])) for i, (n, _) in enumerate(streams) if taken[i] < n]
        if not todo:
            return drawn, False
        rounds = await asyncio.gather(*(streams[i][1](taken[i], count) for i, count in todo))
        for (i, count), samples in zip(todo, rounds, strict=True):
            taken[i] += count
            drawn.extend(samples)
        if any(len(samples) < count for (_, count), samples in zip(todo, rounds, strict=True)):
            return drawn, False  # a stream could not draw (budget): no point asking again


# -- best-of-n -------------------------------------------------------------------------------------------

_SCORE = re.compile(r"score\s*[:=]?\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?", re.I)
_ANY_SCORE = re.compile(r"(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?")
SCORE_SCALE = 10.0


def parse_score(text: str) -> float | None:
    """A verifier's score in [0, 1]: ``Score: 7`` (of 10), ``8/10``, or the last number; ``None`` when
    there is no number in 0..10."""
    matches = list(_SCORE.finditer(text)) or list(_ANY_SCORE.finditer(text))
    if not matches:
        return None
    value, scale = matches[-1].group(1), matches[-1].group(2)
    number = float(value) / float(scale) * SCORE_SCALE if scale and float(scale) > 0 else float(value)
    if not 0.0 <= number <= SCORE_SCALE:
        return None
    return number / SCORE_SCALE


Score = Callable[[Sample], Awaitable[Sequence[Sample]]]
"""``score(candidate)``: the verifier's samples for one candidate (each with ``score`` set or failed)."""


async def best_of_n(candidates: Sequence[Sample], score: Score) -> tuple[Sample | None, list[Sample]]:
    """Score each distinct candidate answer once with the verifier, concurrently; the best mean score
    wins, ties broken by votes and then by draw order. Without any readable score it is a majority
    vote. Returns the winner and every verifier sample."""
    distinct: dict[str, Sample] = {}
    for sample in candidates:
        if sample.key is not None:
            distinct.setdefault(sample.key, sample)
    if not distinct:
        return None, []
    results = await asyncio.gather(*(score(s) for s in distinct.values()))
    votes = Counter(s.key for s in candidates if s.key is not None)
    ranked: list[tuple[float, int, int, Sample]] = []
    verifier_samples: list[Sample] = []
    for position, (candidate, samples) in enumerate(zip(distinct.values(), results, strict=True)):
        verifier_samples.extend(samples)
        scores = [s.score for s in samples if s.score is not None and not s.failed]
        if scores:
            ranked.append((sum(scores) / len(scores), votes[candidate.key], -position, candidate))
    if not ranked:
        return vote(candidates), verifier_samples
    return max(ranked, key=lambda item: item[:3])[3], verifier_samples


# -- prompts ---------------------------------------------------------------------------------------------


def solver_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The stage's own request: an optional system message and the rendered prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return messages


def _numbered(texts: Sequence[str], opener: str = "[", closer: str = "]") -> str:
    return "\n\n".join(f"{opener}{i}{closer} {text.strip()}" for i, text in enumerate(texts, 1))


def context_messages(prompt: str, system: str | None, answers: Sequence[str]) -> list[dict[str, str]]:
    """A solver with predecessors: the stage prompt plus the answers it was sent along its edges."""
    if not answers:
        return solver_messages(prompt, system)
    return solver_messages(f"{prompt}\n\nOther answers to consider:\n\n{_numbered(answers)}", system)


def reviewer_messages(prompt: str, system: str | None, answers: Sequence[str]) -> list[dict[str, str]]:
    text = (
        f"{prompt}\n\nCandidate answers:\n\n{_numbered(answers)}\n\n"
        "Review the candidate answers above: point out any mistakes and say which one is most likely correct. "
        "Do not write a new answer."
    )
    return solver_messages(text, system)


def reviser_messages(prompt: str, system: str | None, answers: Sequence[str], reviews: Sequence[str]) -> list[dict[str, str]]:
    parts = [prompt]
    if answers:
        parts.append(f"Previous answers:\n\n{_numbered(answers)}")
    if reviews:
        parts.append(f"Reviews:\n\n{_numbered(reviews, '(', ')')}")
    parts.append("Taking the above into account, write an improved answer to the original request, in the format it asks for.")
    return solver_messages("\n\n".join(parts), system)


def fusion_messages(prompt: str, system: str | None, answers: Sequence[str], reviews: Sequence[str] = ()) -> list[dict[str, str]]:
    parts = [prompt, f"Candidate answers:\n\n{_numbered(answers)}"]
    if reviews:
        parts.append(f"Reviews:\n\n{_numbered(reviews, '(', ')')}")
    parts.append("Combine the candidates into the single best answer to the original request, in the format it asks for.")
    return solver_messages("\n\n".join(parts), system)


def verifier_messages(prompt: str, system: str | None, answer: str) -> list[dict[str, str]]:
    text = (
        f"{prompt}\n\nProposed answer:\n\n{answer.strip()}\n\n"
        "How likely is the proposed answer to be correct? Reply with 'Score: <0-10>' (10: certainly correct)."
    )
    return solver_messages(text, system)
