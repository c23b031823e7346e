"""Plans, collaboration graphs and the cost model: pure values and functions, no I/O."""

from graphs.cost import (
    AGENTTTS_UNIT_FLOPS,
    CALL1B_UNIT_FLOPS,
    Budget,
    BudgetUnit,
    Cost,
    ModelSpec,
    call_flops,
    decode_flops,
    prefill_flops,
    sample_usd,
)
from graphs.errors import AllotError, BudgetError, DataError, InvalidPlan, StorageError, UnknownModel
from graphs.pareto import pareto_front
from graphs.plan import DecisionRule, Node, Plan, Role, StageGraph

__all__ = [
    "AGENTTTS_UNIT_FLOPS",
    "CALL1B_UNIT_FLOPS",
    "AllotError",
    "Budget",
    "BudgetError",
    "BudgetUnit",
    "Cost",
    "DataError",
    "DecisionRule",
    "InvalidPlan",
    "ModelSpec",
    "Node",
    "Plan",
    "Role",
    "StageGraph",
    "StorageError",
    "UnknownModel",
    "call_flops",
    "decode_flops",
    "pareto_front",
    "prefill_flops",
    "sample_usd",
]
