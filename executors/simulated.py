"""A simulated multi-stage task with parametric per-stage curves and a known optimum.

Searches need a task where the right answer is known, evaluations are free and every AgentTTS insight
holds, so their tests can check that they find the optimum, and how fast. This environment draws such a
task from a seed. Plans are AgentTTS allocations: per stage ``stage1 .. stageN`` one or more solver nodes
decided by majority vote.

The curves (all drawn once from ``numpy.random.default_rng(seed)``; ``P`` is a model's active parameters
in billions, ``x = log2(n)`` for ``n`` samples, ``sigma`` the logistic function):

- single-sample logit ``L1[s, m] = a_s + k_s * ln(P_m) + eps[s, m]``. ``k_s`` (how much stage ``s`` rewards
  size) is spread over the stages and shuffled, and ``eps ~ N(0, 0.35)`` adds per-stage variation, so
  stages prefer different models (insight 1).
- sampling gain ``G[s, m] = g_s * v[s, m] * (1 + 0.5 * small_m)``, with ``g_s ~ 2.6 - 2.4 k_s`` (it runs
  against ``k_s``), ``v ~ U(0.7, 1.3)`` and ``small_m`` 1 for the smallest model, 0 for the largest (log
  scale): on stages that reward size little, a small model with many samples beats a large one at equal
  cost (insight 1).
- local accuracy of one model, ``n`` samples (majority vote):
  ``acc[s, m](n) = sigma(L1 + G * (1 - exp(-r * min(x, x_opt))) - d * max(0, x - x_opt))``: it rises and
  saturates at rate ``r ~ U(0.25, 0.7)`` per doubling, peaks at ``n_opt = 2 ** x_opt`` (4..32 per stage,
  jittered by one doubling per model, kept below ``max_samples``) and past it loses ``d ~ U(0.02, 0.08)``
  logits per doubling (insight 2).
- mixtures: several solver nodes in one stage pool their votes. Nodes of the same model add their
  samples; for different models the best one decides and the others add a small diversity bonus:
  ``acc = a_best + 0.1 * (1 - a_best) * mean(a_others)``.
- coupling: stage ``s`` works on stage ``s - 1``'s output. A bad upstream answer spoils a fraction
  ``coupling`` of the stage's answers unless the stage rescues it; bigger models rescue more
  (``rescue[s, m]``, up to ``rho_s`` for the largest model). With ``u`` the upstream effective accuracy,
  ``eff_s = acc_s * (1 - coupling * (1 - u) * (1 - rescue_s))`` and ``eff_1 = acc_1``. So what stage ``s``
  should buy depends on how much was spent upstream (insight 3): a weak upstream favours a large rescuer,
  a strong one favours cheap samples.
- the score is the last stage's effective accuracy. ``evaluate`` adds ``N(0, noise)`` per repeat (clipped
  to [0, 1]), seeded from ``(seed, plan_id)`` (and ``noise_seed`` where given) so a plan always gets the
  same evaluation.

Costs are real FLOPs (``graphs.cost.call_flops``) with per-stage prompt (200..1200) and output (100..600)
token counts. Temperatures are ignored. ``optimum(budget)`` returns the exact best allocation;
``true_score``, ``stage_accuracy``, ``stage_cost`` and ``rescue`` expose the curves to tests. Pure
computation, no I/O.

**Collaboration graphs** (``graphs=True``; Agent-REINFORCE's search space). A stage may then hold
reviewer, reviser and aggregator nodes joined by edges and decide by ``fusion``; ``info.roles`` and
``info.decisions`` say so. Each node's accuracy ``a`` (the chance its answer is right) is computed in
topological order; ``logit`` and ``sigma`` convert between accuracy and log-odds. With the stage-level
parameters drawn from their own seeded stream (so the allocation curves above do not move):
``depth_gain g ~ U(0.4, 1.0)``, ``depth_opt in {1, 2, 3}``, ``depth_decline ~ U(0.15, 0.4)``,
``interaction lam ~ U(-0.1, 0.3)`` and ``fusion phi ~ U(0.15, 0.5)``:

- solver (no inputs): ``acc[s, m](n)`` above. **Width** is its samples (majority vote saturates and then
  declines past ``n_opt``) and the number of parallel solvers.
- vote over answer-bearing nodes (solvers, revisers, aggregators): solvers pool by model as above, each
  other node is one more voter; ``a = a_best + 0.1 * (1 - a_best) * mean(a_others)``. Without edges and
  helpers this is exactly the allocation model.
- reviewer (model ``m``, ``n`` samples) reads answers and writes a critique of quality ``q = acc[s, m](n)``;
  it is not an answer (a review nobody reads is invalid).
- reviser (model ``m``, ``n``): rewrites the vote of its answer inputs ``a_in`` given the best critique
  among its reviewer inputs (without one it critiques itself at ``q = 0.5 * acc[s, m](1)``). Its
  **depth** ``r`` is 1 + the most reviser rounds on any path into it. Round ``r`` adds
  ``g * 0.6 ** (r - 1) * (q + acc[s, m](n)) / 2 / max(0.5, 1 + lam * log2(w))`` logits while
  ``r <= depth_opt`` and loses ``depth_decline * (r - depth_opt)`` logits past it (over-revision breaks
  right answers): accuracy over depth rises to a task-dependent optimum, then declines. ``w`` is the
  number of solver samples upstream of the reviser: the **width/depth interaction**. With ``lam > 0``
  depth substitutes for width (revising a wide vote gains less); with ``lam < 0`` they complement (more
  candidates make a better revision).
- aggregator (model ``m``): **fusion** of its answer inputs, ``logit(a) = logit(vote) + phi * (2 * size_m
  - 1) + 0.5 * g * q_best`` (``size_m`` in [0, 1] on a log scale; ``q_best`` from reviewer inputs, else
  0): a bit better than majority vote for strong aggregator models, a bit worse for weak ones.
- the stage's answer: the aggregator sink under ``fusion``, else the vote over the sinks. Its rescue is
  the best rescue among all its nodes' models; coupling across stages is unchanged.

Costs follow edges: a node's prompt is the stage prompt plus every sample its inputs wrote (a reviewer
writes half a solver's output tokens), so wide inputs make reviewers, revisers and aggregators dear, and
a node whose prompt and output exceed its model's context window is invalid. Every node pays
``call_flops(model, prompt, output, n)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from executors.environment import Environment, EnvironmentInfo, Evaluation
from graphs.cost import Budget, Cost, ModelSpec, call_flops, sample_usd
from graphs.errors import BudgetError, InvalidPlan, UnknownModel
from graphs.plan import DecisionRule, Node, Plan, Role, StageGraph

__all__ = ["DEFAULT_MODELS", "GRAPH_DECISIONS", "GRAPH_ROLES", "MIXTURE_BONUS", "N_CHOICES", "SimulatedEnvironment"]

MIXTURE_BONUS = 0.1
"""Share of the best model's errors another model in the same stage fixes, times its accuracy."""

N_EXAMPLES = 100
GRAPH_ROLES = (Role.SOLVER, Role.REVIEWER, Role.REVISER, Role.AGGREGATOR)
"""Roles a ``graphs=True`` environment runs."""
GRAPH_DECISIONS = (DecisionRule.MAJORITY_VOTE, DecisionRule.FUSION)
"""Decision rules a ``graphs=True`` environment runs."""
ROUND_DECAY = 0.6  # each further useful revision round gains this share of the one before
SELF_REVIEW = 0.5  # a reviser without a reviewer critiques itself at half its accuracy
REVIEW_SHARE = 0.5  # a review is half as long as an answer
FUSION_REVIEW = 0.5  # an aggregator reading reviews gains half a revision round's worth
_ANSWER_ROLES = (Role.SOLVER, Role.REVISER, Role.AGGREGATOR)
_GRAPH_SEED = 0x6772617068  # "graph": the graph parameters' own stream

DEFAULT_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="sim-1B",
            params_b=1.24,
            layers=16,
            hidden=2048,
            input_usd_per_mtok=0.02,
            output_usd_per_mtok=0.04,
            context=131072,
        ),
        ModelSpec(
            name="sim-3B",
            params_b=3.21,
            layers=28,
            hidden=3072,
            input_usd_per_mtok=0.05,
            output_usd_per_mtok=0.10,
            context=131072,
        ),
        ModelSpec(
            name="sim-8B",
            params_b=8.03,
            layers=32,
            hidden=4096,
            input_usd_per_mtok=0.15,
            output_usd_per_mtok=0.20,
            context=131072,
        ),
        ModelSpec(
            name="sim-70B",
            params_b=70.6,
            layers=80,
            hidden=8192,
            input_usd_per_mtok=0.60,
            output_usd_per_mtok=0.80,
            context=131072,
        ),
    )
}
"""Four dense Llama-3-shaped models, as in the AgentTTS and Agent-REINFORCE model pools."""

N_CHOICES = (1, 2, 4, 8, 16, 32, 64)
"""Sample counts ``optimum`` enumerates by default (AgentTTS's powers of two)."""


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _log_odds(p: float) -> float:
    p = min(max(p, 1e-9), 1.0 - 1e-9)
    return math.log(p / (1.0 - p))


class SimulatedEnvironment(Environment):
    """A seeded multi-stage task whose accuracy curves are known, so its optimum is known too."""

    kind = "simulated"
    votes_over_prefixes = True

    def __init__(
        self,
        stages: int = 3,
        models: Mapping[str, ModelSpec] | None = None,
        seed: int = 0,
        noise: float = 0.02,
        repeats: int = 4,
        coupling: float = 0.5,
        max_samples: int = 64,
        name: str | None = None,
        graphs: bool = False,
        noise_seed: int | None = None,
    ) -> None:
        """``graphs=True`` also runs reviewer, reviser and aggregator nodes, edges and fusion (see the
        module docstring); by default stages are AgentTTS allocations (independent solvers, majority vote).
        ``noise_seed`` draws the evaluation noise from another stream: the same task (curves, costs, optimum)
        with other evaluation luck; ``None`` draws it from ``seed``."""
        models = dict(DEFAULT_MODELS if models is None else models)
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        if not models:
            raise ValueError("models must name at least one model")
        for key, spec in models.items():
            if key != spec.name:
                raise ValueError(f"model key {key!r} differs from its spec's name {spec.name!r}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if not 0.0 <= coupling <= 1.0:
            raise ValueError(f"coupling must be in [0, 1], got {coupling}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.stages = int(stages)
        self.models: dict[str, ModelSpec] = models
        self.seed = int(seed)
        self.noise = float(noise)
        self.repeats = int(repeats)
        self.coupling = float(coupling)
        self.max_samples = int(max_samples)
        self.graphs = bool(graphs)
        self.noise_seed = None if noise_seed is None else int(noise_seed)
        suffix = "-graphs" if self.graphs else ""
        self.name = name or f"simulated-{self.stages}x{len(models)}-seed{self.seed}{suffix}"
        self.stage_names = tuple(f"stage{i + 1}" for i in range(self.stages))
        self._stage_index = {stage: i for i, stage in enumerate(self.stage_names)}
        self._draw()
        self._acc_cache: dict[tuple[int, str, int], float] = {}
        self._cost_cache: dict[tuple[int, str, int], Cost] = {}
        self._graph_cache: dict[StageGraph, tuple[float, float, Cost]] = {}
        self._info = EnvironmentInfo(
            name=self.name,
            stages=self.stage_names,
            models=dict(self.models),
            stage_models={stage: tuple(self._names) for stage in self.stage_names},
            max_samples={model: self.max_samples for model in self._names},
            caps=(None,),
            decisions=GRAPH_DECISIONS if self.graphs else (DecisionRule.MAJORITY_VOTE,),
            roles=GRAPH_ROLES if self.graphs else (Role.SOLVER,),
            early_stop=False,
            n_examples=N_EXAMPLES,
        )

    def _draw(self) -> None:
        """Draw every curve parameter from the seed (models in name order, so mapping order is moot)."""
        rng = np.random.default_rng(self.seed)
        names = sorted(self.models)
        self._names = names
        log_p = np.array([math.log(self.models[m].active_params / 1e9) for m in names])
        span = float(log_p.max() - log_p.min())
        size = (log_p - log_p.min()) / span if span > 0 else np.full(len(names), 0.5)
        s, m = self.stages, len(names)
        # Stage types spread from "sampling-friendly" (small k) to "size-hungry" (large k), shuffled.
        k = rng.permutation(np.linspace(0.2, 0.7, s)) + rng.uniform(-0.05, 0.05, s)
        mid_logit = np.log(0.4 / 0.6) + rng.uniform(-0.5, 0.3, s)
        a = mid_logit - k * float(np.median(log_p))
        eps = rng.normal(0.0, 0.35, (s, m))
        l1 = a[:, None] + k[:, None] * log_p[None, :] + eps
        g = np.clip(2.6 - 2.4 * k + rng.uniform(-0.2, 0.2, s), 0.3, None)
        gain = g[:, None] * rng.uniform(0.7, 1.3, (s, m)) * (1.0 + 0.5 * (1.0 - size))[None, :]
        rate = rng.uniform(0.25, 0.7, (s, m))
        top = max(1, int(math.log2(self.max_samples)) - 1)
        x_stage = rng.integers(2, 6, s)  # n_opt 4 .. 32 per stage
        x_opt = np.clip(x_stage[:, None] + rng.integers(-1, 2, (s, m)), 1, top)
        decline = rng.uniform(0.02, 0.08, (s, m))
        rho = rng.uniform(0.3, 0.8, s)
        rescue = np.clip(rho[:, None] * size[None, :] + rng.normal(0.0, 0.04, (s, m)), 0.0, 0.95)
        prompt = rng.integers(200, 1200, s)
        output = rng.integers(100, 600, s)
        self._params: list[dict[str, tuple[float, ...]]] = [
            {
                name: (
                    float(l1[i, j]),
                    float(gain[i, j]),
                    float(rate[i, j]),
                    float(x_opt[i, j]),
                    float(decline[i, j]),
                    float(rescue[i, j]),
                )
                for j, name in enumerate(names)
            }
            for i in range(s)
        ]
        self.prompt_tokens = tuple(int(t) for t in prompt)
        self.output_tokens = tuple(int(t) for t in output)
        self._size = {name: float(size[j]) for j, name in enumerate(names)}
        graph_rng = np.random.default_rng([self.seed, _GRAPH_SEED])
        self._graph_params: list[dict[str, float]] = [
            {
                "depth_gain": float(graph_rng.uniform(0.4, 1.0)),
                "depth_opt": float(graph_rng.integers(1, 4)),
                "depth_decline": float(graph_rng.uniform(0.15, 0.4)),
                "interaction": float(graph_rng.uniform(-0.1, 0.3)),
                "fusion": float(graph_rng.uniform(0.15, 0.5)),
            }
            for _ in range(s)
        ]

    # -- the Environment interface ------------------------------------------------------------------

    @property
    def info(self) -> EnvironmentInfo:
        return self._info

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "stages": self.stages,
            "models": {name: spec.model_dump(mode="json") for name, spec in self.models.items()},
            "seed": self.seed,
            "noise": self.noise,
            "repeats": self.repeats,
            "coupling": self.coupling,
            "max_samples": self.max_samples,
            "name": self.name,
            "graphs": self.graphs,
            "noise_seed": self.noise_seed,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> SimulatedEnvironment:
        """Rebuild from ``spec()`` (e.g. in a Celery worker)."""
        args = dict(spec)
        kind = args.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"spec kind {kind!r} is not {cls.kind!r}")
        models = args.pop("models", None)
        if models is not None:
            models = {name: ModelSpec.model_validate(value) for name, value in models.items()}
        return cls(models=models, **args)

    def check(self, plan: Plan) -> None:
        names = {stage.stage for stage in plan.stages}
        expected = set(self.stage_names)
        if names != expected:
            unknown = sorted(names - expected)
            missing = sorted(expected - names)
            what = f"unknown stage(s) {unknown}" if unknown else f"missing stage(s) {missing}"
            raise InvalidPlan(f"plan has {what}; this simulated task has stages {list(self.stage_names)}")
        for stage in plan.stages:
            if self.graphs:
                self._check_graph(stage)
                continue
            if stage.decision is not DecisionRule.MAJORITY_VOTE:
                raise InvalidPlan(
                    f"stage {stage.stage!r} decides by {stage.decision}; the simulated environment supports majority_vote only"
                )
            if stage.early_stop is not None:
                raise InvalidPlan(f"stage {stage.stage!r} sets early_stop; the simulated environment has none")
            if stage.edges:
                raise InvalidPlan(
                    f"stage {stage.stage!r} has edges; the simulated environment takes independent solver nodes only"
                )
            for node in stage.nodes:
                if node.model not in self.models:
                    raise UnknownModel(
                        f"unknown model {node.model!r} in stage {stage.stage!r}; known models: {', '.join(self._names)}"
                    )
                if node.role is not Role.SOLVER:
                    raise InvalidPlan(
                        f"node {node.id!r} of stage {stage.stage!r} has role {node.role}; "
                        "the simulated environment supports solver nodes only"
                    )
                if node.n > self.max_samples:
                    raise InvalidPlan(
                        f"node {node.id!r} of stage {stage.stage!r} asks for {node.n} samples "
                        f"of {node.model}; at most {self.max_samples} are allowed"
                    )
                if node.max_tokens is not None:
                    raise InvalidPlan(
                        f"node {node.id!r} of stage {stage.stage!r} caps tokens at "
                        f"{node.max_tokens}; the simulated environment supports no caps"
                    )

    def _check_graph(self, stage: StageGraph) -> None:
        """The rules of a collaboration graph the simulation can run (``graphs=True``)."""
        where = f"stage {stage.stage!r}"
        if stage.decision not in GRAPH_DECISIONS:
            allowed = ", ".join(d.value for d in GRAPH_DECISIONS)
            raise InvalidPlan(f"{where} decides by {stage.decision}; the simulated environment supports {allowed}")
        if stage.early_stop is not None:
            raise InvalidPlan(f"{where} sets early_stop; the simulated environment has none")
        inputs: dict[str, list[Node]] = {node.id: [] for node in stage.nodes}
        fed = {src for src, _ in stage.edges}
        for src, dst in stage.edges:
            inputs[dst].append(stage.node(src))
        prompts = self._prompt_sizes(self._stage_index[stage.stage], stage)
        for node in stage.nodes:
            if node.model not in self.models:
                raise UnknownModel(f"unknown model {node.model!r} in {where}; known models: {', '.join(self._names)}")
            if node.role not in GRAPH_ROLES:
                roles = ", ".join(r.value for r in GRAPH_ROLES)
                raise InvalidPlan(f"node {node.id!r} of {where} has role {node.role}; the simulated environment runs {roles}")
            if node.n > self.max_samples:
                raise InvalidPlan(
                    f"node {node.id!r} of {where} asks for {node.n} samples of {node.model}; "
                    f"at most {self.max_samples} are allowed"
                )
            if node.max_tokens is not None:
                raise InvalidPlan(
                    f"node {node.id!r} of {where} caps tokens at {node.max_tokens}; the simulated environment supports no caps"
                )
            answers = [u for u in inputs[node.id] if u.role in _ANSWER_ROLES]
            if node.role is Role.SOLVER and inputs[node.id]:
                raise InvalidPlan(f"solver {node.id!r} of {where} has inputs; in the simulation a reviser revises answers")
            if node.role is not Role.SOLVER and not answers:
                raise InvalidPlan(f"{node.role} {node.id!r} of {where} has no answer to work on: give it a solver input")
            if node.role is Role.REVIEWER and node.id not in fed:
                raise InvalidPlan(f"reviewer {node.id!r} of {where} feeds nothing: connect it to a reviser or aggregator")
            window = self.models[node.model].context
            prompt, output = prompts[node.id]
            if window is not None and prompt + output > window:
                raise InvalidPlan(
                    f"node {node.id!r} of {where} needs {prompt + output} tokens of context; {node.model} has {window}"
                )

    def estimate_cost(self, plan: Plan) -> Cost:
        self.check(plan)
        return self._plan_cost(plan)

    def evaluate(self, plan: Plan) -> Evaluation:
        self.check(plan)
        mean = self._plan_score(plan)
        cost = self._plan_cost(plan)
        stream = [self.seed, int(plan.plan_id[:16], 16)]
        rng = np.random.default_rng(stream if self.noise_seed is None else [*stream, self.noise_seed])
        draws = np.clip(mean + self.noise * rng.standard_normal(self.repeats), 0.0, 1.0)
        scores = tuple(float(v) for v in draws)
        return Evaluation(
            score=float(draws.mean()),
            spread=float(draws.std()),
            cost=cost,
            scores=scores,
            n_examples=N_EXAMPLES,
            llm_calls=0,
        )

    def with_evaluation_seed(self, seed: int) -> SimulatedEnvironment:
        """The same task with its evaluation noise drawn from ``seed`` (``noise_seed``)."""
        return type(self).from_spec({**self.spec(), "noise_seed": seed})

    # -- the known answer ---------------------------------------------------------------------------

    def true_score(self, plan: Plan) -> float:
        """The noiseless expected score of ``plan``: the last stage's effective accuracy."""
        self.check(plan)
        return self._plan_score(plan)

    def stage_accuracy(self, stage: str, model: str, n: int) -> float:
        """Local (upstream-independent) majority-vote accuracy of ``n`` samples of ``model`` at ``stage``."""
        return self._accuracy(self._locate(stage, model, n), model, n)

    def stage_cost(self, stage: str, model: str, n: int) -> Cost:
        """Cost of one node at one stage: what a search adds up when it builds a plan stage by stage."""
        return self._node_cost(self._locate(stage, model, n), model, n)

    def stage_graph_accuracy(self, graph: StageGraph) -> float:
        """Local (upstream-independent) accuracy of one stage's collaboration graph (``graphs=True``)."""
        self._check_stage_graph(graph)
        i = self._stage_index[graph.stage]
        if not _is_graph(graph):
            pool: dict[str, int] = {}
            for node in graph.nodes:
                pool[node.model] = pool.get(node.model, 0) + node.n
            return self._stage_local(i, pool)[0]
        return self._graph_stage(i, graph)[0]

    def stage_graph_cost(self, graph: StageGraph) -> Cost:
        """Cost of one stage's collaboration graph, context growing along its edges."""
        self._check_stage_graph(graph)
        return self._graph_stage(self._stage_index[graph.stage], graph)[2]

    def _check_stage_graph(self, graph: StageGraph) -> None:
        if graph.stage not in self._stage_index:
            raise InvalidPlan(f"unknown stage {graph.stage!r}; this simulated task has stages {list(self.stage_names)}")
        if not self.graphs:
            raise InvalidPlan("collaboration graphs need SimulatedEnvironment(graphs=True)")
        self._check_graph(graph)

    def graph_parameters(self, stage: str) -> dict[str, float]:
        """The collaboration-graph curve of ``stage``: ``depth_gain``, ``depth_opt`` (the best number of
        revision rounds), ``depth_decline``, ``interaction`` (width/depth) and ``fusion``."""
        if stage not in self._stage_index:
            raise InvalidPlan(f"unknown stage {stage!r}; this simulated task has stages {list(self.stage_names)}")
        return dict(self._graph_params[self._stage_index[stage]])

    def rescue(self, stage: str, model: str) -> float:
        """Share of bad upstream answers ``model`` recovers from at ``stage`` (bigger models rescue more)."""
        return self._params[self._locate(stage, model)][model][5]

    def optimum(self, budget: Budget, n_choices: Iterable[int] = N_CHOICES) -> tuple[Plan, float]:
        """The best single-model-per-stage allocation within ``budget``: the known answer searches chase.

        Exact, and equal to enumerating every allocation, but stage by stage over Pareto fronts of
        (cost so far, effective accuracy so far): a stage's effective accuracy never falls when its
        upstream's rises, so a prefix that costs more and reaches less can never lead to the optimum.
        This keeps 5+ stages fast where plain enumeration (28 ** stages plans) would not be.
        """
        choices = tuple(sorted(set(n_choices)))
        if not choices or choices[0] < 1 or choices[-1] > self.max_samples:
            raise InvalidPlan(f"n_choices must lie in 1..{self.max_samples}, got {list(choices)}")
        options = [(m, n) for m in self._names for n in choices]
        spent = [{opt: budget.spent(self._node_cost(i, *opt)) for opt in options} for i in range(self.stages)]
        limit = budget.limit * (1 + 1e-9)
        # front: (spent, effective accuracy, choices so far), cheapest first, accuracy strictly rising
        front: list[tuple[float, float, tuple[tuple[str, int], ...]]] = [(0.0, 1.0, ())]
        for i in range(self.stages):
            grown = []
            for cost, upstream, combo in front:
                for opt in options:
                    total = cost + spent[i][opt]
                    if total <= limit:
                        grown.append((total, self._step(i, {opt[0]: opt[1]}, upstream), (*combo, opt)))
            if not grown:
                cheapest = tuple(min(options, key=spent[j].__getitem__) for j in range(self.stages))
                plan = self._allocation(cheapest)
                total = sum(spent[j][opt] for j, opt in enumerate(cheapest))
                raise BudgetError(
                    f"budget {budget} is below the cheapest plan ({plan.summary()}), which costs {total:.4g} {budget.unit.value}"
                )
            grown.sort(key=lambda state: (state[0], -state[1]))
            front = []
            for state in grown:
                if not front or state[1] > front[-1][1]:
                    front.append(state)
        _, score, combo = max(front, key=lambda state: (state[1], -state[0]))
        return self._allocation(combo), score

    # -- internals ----------------------------------------------------------------------------------

    def _locate(self, stage: str, model: str, n: int = 1) -> int:
        """Validate a (stage, model, n) choice and return the stage's index."""
        if stage not in self._stage_index:
            raise InvalidPlan(f"unknown stage {stage!r}; this simulated task has stages {list(self.stage_names)}")
        if model not in self.models:
            raise UnknownModel(f"unknown model {model!r}; known models: {', '.join(self._names)}")
        if n < 1:
            raise InvalidPlan(f"n must be >= 1, got {n}")
        return self._stage_index[stage]

    def _plan_score(self, plan: Plan) -> float:
        """Pool each stage's nodes by model (same model: samples add up), then run the chain."""
        if any(_is_graph(stage) for stage in plan.stages):
            return self._graph_chain_score(plan)
        pools: list[dict[str, int]] = [{} for _ in self.stage_names]
        for stage in plan.stages:
            pool = pools[self._stage_index[stage.stage]]
            for node in stage.nodes:
                pool[node.model] = pool.get(node.model, 0) + node.n
        return self._chain_score(pools)

    def _plan_cost(self, plan: Plan) -> Cost:
        total = Cost()
        for stage in plan.stages:
            i = self._stage_index[stage.stage]
            if _is_graph(stage):
                total = total + self._graph_stage(i, stage)[2]
                continue
            for node in stage.nodes:
                total = total + self._node_cost(i, node.model, node.n)
        return total

    def search_cost(self, plans: Sequence[Plan]) -> tuple[Cost, Cost]:
        """With reuse, a stage's samples are generated once per distinct upstream: a solver node of
        ``model`` at stage i is keyed by the plan's stages before i (what its prompt is built from) and
        its model, and costs the largest ``n`` any plan asked of it. Graph stages (reviewers, fusion)
        are charged in full: their prompts hold other nodes' outputs."""
        without = Cost()
        largest: dict[tuple[str, int, str], int] = {}
        graphs = Cost()
        for plan in plans:
            without = without + self.estimate_cost(plan)
            for position, stage in enumerate(plan.stages):
                i = self._stage_index[stage.stage]
                if _is_graph(stage):
                    graphs = graphs + self._graph_stage(i, stage)[2]
                    continue
                upstream = Plan(stages=plan.stages[:position]).plan_id if position else ""
                for node in stage.nodes:
                    key = (upstream, i, node.model)
                    largest[key] = max(largest.get(key, 0), node.n)
        with_reuse = graphs
        for (_, i, model), n in largest.items():
            with_reuse = with_reuse + self._node_cost(i, model, n)
        return with_reuse, without

    # -- collaboration graphs -----------------------------------------------------------------------

    def _graph_chain_score(self, plan: Plan) -> float:
        upstream = 1.0
        for stage in sorted(plan.stages, key=lambda g: self._stage_index[g.stage]):
            i = self._stage_index[stage.stage]
            if _is_graph(stage):
                acc, rescue, _ = self._graph_stage(i, stage)
            else:
                pool: dict[str, int] = {}
                for node in stage.nodes:
                    pool[node.model] = pool.get(node.model, 0) + node.n
                acc, rescue = self._stage_local(i, pool)
            upstream = acc * (1.0 - self.coupling * (1.0 - upstream) * (1.0 - rescue))
        return upstream

    def _vote(self, i: int, solvers: Mapping[str, int], others: Sequence[float]) -> float:
        """Majority vote over answers: solver samples pool by model, every other answer is one voter."""
        accs = sorted([*(self._accuracy(i, m, n) for m, n in solvers.items()), *others], reverse=True)
        best = accs[0]
        if len(accs) > 1:
            best += MIXTURE_BONUS * (1.0 - best) * (sum(accs[1:]) / (len(accs) - 1))
        return best

    def _prompt_sizes(self, i: int, stage: StageGraph) -> dict[str, tuple[int, int]]:
        """(prompt, output) tokens per sample of every node: inputs' samples are appended to the prompt."""
        base, answer = self.prompt_tokens[i], self.output_tokens[i]
        review = max(1, math.ceil(REVIEW_SHARE * answer))
        out = {node.id: review if node.role is Role.REVIEWER else answer for node in stage.nodes}
        prompt = dict.fromkeys(out, base)
        for src, dst in stage.edges:
            prompt[dst] += stage.node(src).n * out[src]
        return {nid: (prompt[nid], out[nid]) for nid in out}

    def _graph_stage(self, i: int, stage: StageGraph) -> tuple[float, float, Cost]:
        """Local accuracy, rescue and cost of a collaboration graph (see the module docstring)."""
        cached = self._graph_cache.get(stage)
        if cached is not None:
            return cached
        par = self._graph_params[i]
        nodes = {node.id: node for node in stage.nodes}
        inputs: dict[str, list[str]] = {nid: [] for nid in nodes}
        for src, dst in stage.edges:
            inputs[dst].append(src)
        acc: dict[str, float] = {}
        quality: dict[str, float] = {}
        depth: dict[str, int] = {}
        width: dict[str, dict[str, int]] = {}  # solver node id -> n, over every solver upstream

        def vote_of(ids: Iterable[str]) -> float:
            solvers: dict[str, int] = {}
            others = []
            for nid in ids:
                node = nodes[nid]
                if node.role is Role.SOLVER:
                    solvers[node.model] = solvers.get(node.model, 0) + node.n
                elif node.role in _ANSWER_ROLES:
                    others.append(acc[nid])
            return self._vote(i, solvers, others)

        for nid in _topological(stage):
            node = nodes[nid]
            preds = inputs[nid]
            upstream: dict[str, int] = {}
            for u in preds:
                upstream.update(width[u])
            width[nid] = {nid: node.n} if node.role is Role.SOLVER else upstream
            depth[nid] = max((depth[u] for u in preds), default=0)
            reviews = [quality[u] for u in preds if nodes[u].role is Role.REVIEWER]
            if node.role is Role.SOLVER:
                acc[nid] = self._accuracy(i, node.model, node.n)
            elif node.role is Role.REVIEWER:
                quality[nid] = self._accuracy(i, node.model, node.n)
            elif node.role is Role.REVISER:
                depth[nid] += 1
                r = depth[nid]
                q = max(reviews) if reviews else SELF_REVIEW * self._accuracy(i, node.model, 1)
                if r <= par["depth_opt"]:
                    w = max(1, sum(width[nid].values()))
                    damp = max(0.5, 1.0 + par["interaction"] * math.log2(w))
                    skill = self._accuracy(i, node.model, node.n)
                    delta = par["depth_gain"] * ROUND_DECAY ** (r - 1) * (q + skill) / 2.0 / damp
                else:
                    delta = -par["depth_decline"] * (r - par["depth_opt"])
                acc[nid] = _sigmoid(_log_odds(vote_of(preds)) + delta)
            else:  # aggregator: fusion of its inputs
                bonus = par["fusion"] * (2.0 * self._size[node.model] - 1.0)
                bonus += FUSION_REVIEW * par["depth_gain"] * max(reviews, default=0.0)
                acc[nid] = _sigmoid(_log_odds(vote_of(preds)) + bonus)
        if stage.decision is DecisionRule.FUSION:
            local = acc[stage.answer_nodes[0].id]
        else:
            local = vote_of(node.id for node in stage.answer_nodes)
        rescue = max(self._params[i][node.model][5] for node in stage.nodes)
        cost = Cost()
        for nid, (prompt, output) in self._prompt_sizes(i, stage).items():
            spec, n = self.models[nodes[nid].model], nodes[nid].n
            cost = cost + Cost(
                flops=call_flops(spec, prompt, output, n),
                prompt_tokens=float(prompt),
                output_tokens=float(n * output),
                usd=sample_usd(spec, prompt, output, n),
            )
        result = self._graph_cache[stage] = (local, rescue, cost)
        return result

    def _allocation(self, combo: tuple[tuple[str, int], ...]) -> Plan:
        return Plan.allocation(dict(zip(self.stage_names, combo, strict=True)))

    def _accuracy(self, i: int, model: str, n: int) -> float:
        key = (i, model, n)
        acc = self._acc_cache.get(key)
        if acc is None:
            l1, gain, rate, x_opt, decline, _ = self._params[i][model]
            x = math.log2(n)
            logit = l1 + gain * (1.0 - math.exp(-rate * min(x, x_opt))) - decline * max(0.0, x - x_opt)
            acc = self._acc_cache[key] = _sigmoid(logit)
        return acc

    def _stage_local(self, i: int, pool: Mapping[str, int]) -> tuple[float, float]:
        """Local accuracy and rescue of a stage's pooled nodes."""
        accs = sorted((self._accuracy(i, m, n) for m, n in pool.items()), reverse=True)
        best = accs[0]
        if len(accs) > 1:
            best += MIXTURE_BONUS * (1.0 - best) * (sum(accs[1:]) / (len(accs) - 1))
        rescue = max(self._params[i][m][5] for m in pool)
        return best, rescue

    def _step(self, i: int, pool: Mapping[str, int], upstream: float) -> float:
        """Effective accuracy of stage ``i`` given its upstream's (stage 1 has none: pass 1.0)."""
        acc, rescue = self._stage_local(i, pool)
        return acc * (1.0 - self.coupling * (1.0 - upstream) * (1.0 - rescue))

    def _chain_score(self, pools: list[dict[str, int]]) -> float:
        upstream = 1.0
        for i, pool in enumerate(pools):
            upstream = self._step(i, pool, upstream)
        return upstream

    def _node_cost(self, i: int, model: str, n: int) -> Cost:
        key = (i, model, n)
        cost = self._cost_cache.get(key)
        if cost is None:
            spec = self.models[model]
            p, o = self.prompt_tokens[i], self.output_tokens[i]
            cost = self._cost_cache[key] = Cost(
                flops=call_flops(spec, p, o, n),
                prompt_tokens=float(p),
                output_tokens=float(n * o),
                usd=sample_usd(spec, p, o, n),
            )
        return cost

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SimulatedEnvironment) and other.spec() == self.spec()

    def __hash__(self) -> int:
        return hash((self.kind, self.seed, self.stages, tuple(sorted(self.models)), self.name))

    def __repr__(self) -> str:
        return (
            f"SimulatedEnvironment(stages={self.stages}, models={self._names}, seed={self.seed}, "
            f"noise={self.noise}, repeats={self.repeats}, coupling={self.coupling}" + (", graphs=True)" if self.graphs else ")")
        )


def _is_graph(stage: StageGraph) -> bool:
    """Whether a stage needs the graph model (edges, helpers or fusion), not the allocation model."""
    return (
        bool(stage.edges)
        or stage.decision is not DecisionRule.MAJORITY_VOTE
        or any(n.role is not Role.SOLVER for n in stage.nodes)
    )


def _topological(stage: StageGraph) -> list[str]:
    """Node ids in a topological order (ties by id, so the order is stable)."""
    indegree = {node.id: 0 for node in stage.nodes}
    children: dict[str, list[str]] = {node.id: [] for node in stage.nodes}
    for src, dst in stage.edges:
        indegree[dst] += 1
        children[src].append(dst)
    ready = sorted(nid for nid, d in indegree.items() if d == 0)
    order = []
    while ready:
        nid = ready.pop(0)
        order.append(nid)
        for child in children[nid]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
        ready.sort()
    return order
