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
  to [0, 1]), seeded from ``(seed, plan_id)`` so a plan always gets the same evaluation.

Costs are real FLOPs (``graphs.cost.call_flops``) with per-stage prompt (200..1200) and output (100..600)
token counts. Temperatures are ignored. ``optimum(budget)`` returns the exact best allocation;
``true_score``, ``stage_accuracy``, ``stage_cost`` and ``rescue`` expose the curves to tests. Pure
computation, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from executors.environment import Environment, EnvironmentInfo, Evaluation
from graphs.cost import Budget, Cost, ModelSpec, call_flops, sample_usd
from graphs.errors import BudgetError, InvalidPlan, UnknownModel
from graphs.plan import DecisionRule, Plan, Role

__all__ = ["DEFAULT_MODELS", "MIXTURE_BONUS", "N_CHOICES", "SimulatedEnvironment"]

MIXTURE_BONUS = 0.1
"""Share of the best model's errors another model in the same stage fixes, times its accuracy."""

N_EXAMPLES = 100

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


class SimulatedEnvironment(Environment):
    """A seeded multi-stage task whose accuracy curves are known, so its optimum is known too."""

    kind = "simulated"

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
    ) -> None:
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
        self.name = name or f"simulated-{self.stages}x{len(models)}-seed{self.seed}"
        self.stage_names = tuple(f"stage{i + 1}" for i in range(self.stages))
        self._stage_index = {stage: i for i, stage in enumerate(self.stage_names)}
        self._draw()
        self._acc_cache: dict[tuple[int, str, int], float] = {}
        self._cost_cache: dict[tuple[int, str, int], Cost] = {}
        self._info = EnvironmentInfo(
            name=self.name,
            stages=self.stage_names,
            models=dict(self.models),
            stage_models={stage: tuple(self._names) for stage in self.stage_names},
            max_samples={model: self.max_samples for model in self._names},
            caps=(None,),
            decisions=(DecisionRule.MAJORITY_VOTE,),
            roles=(Role.SOLVER,),
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

    def estimate_cost(self, plan: Plan) -> Cost:
        self.check(plan)
        return self._plan_cost(plan)

    def evaluate(self, plan: Plan) -> Evaluation:
        self.check(plan)
        mean = self._plan_score(plan)
        cost = self._plan_cost(plan)
        rng = np.random.default_rng([self.seed, int(plan.plan_id[:16], 16)])
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
            for node in stage.nodes:
                total = total + self._node_cost(i, node.model, node.n)
        return total

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
            f"noise={self.noise}, repeats={self.repeats}, coupling={self.coupling})"
        )
