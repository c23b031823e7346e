"""``SQLStorage``: the storage contract on SQL (a SQLite file by default, PostgreSQL by URL).

Each method is one transaction in its own session; no session or row object leaves this module, only
frozen records. Concurrency is handled by the database, not by hope:

- trial numbers: the study row is locked (``FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite)
  before ``max(number) + 1`` is read, and the unique ``(study_id, number)`` constraint backs that up with
  a retry should two writers still collide;
- finishing: a conditional ``UPDATE ... WHERE state IN ('waiting', 'running')``, so of two processes
  finishing one trial exactly one succeeds and the other gets ``RuntimeError``;
- plans: ``INSERT ... ON CONFLICT DO NOTHING`` by plan id, so a plan is stored once whoever stores it;
- graph versions: like trial numbers, but there is no graph row to lock, so the graph's name is locked
  (a transaction-scoped advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) before
  ``max(version) + 1`` is read, and the unique ``(graph, version)`` constraint backs it up with a retry;
- samples: ``INSERT ... ON CONFLICT DO NOTHING`` on the unique sample key, so adding a stored sample
  again, from any process, keeps the first. Their commit does not wait for the disk on PostgreSQL
  (``relax_commit``): a crash of the database server may lose the last fraction of a second of them,
  which are then generated again; a crash of the process that stored them loses nothing.
"""

from __future__ import annotations

import string
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, bindparam, func, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, col, select

from graphs.cost import Budget, BudgetUnit, Cost
from graphs.errors import StorageError
from graphs.plan import Plan
from planner.graph_record import GraphVersion
from planner.storage._base import BaseStorage, DuplicateStudy, SampleRecord
from planner.storage.database import (
    default_database_url,
    ensure_schema,
    make_engine,
    mask_url,
    relax_commit,
    session_scope,
    storage_error,
)
from planner.storage.tables import (
    GraphVersionRow,
    PlanRow,
    SampleRow,
    StudyRow,
    TrialRow,
    finite_prefix_scores,
    finite_scores,
    strict_json,
    utcnow,
)
from planner.trial import FrozenTrial, StudyRecord, TrialState

__all__ = ["SQLStorage", "insert_graph_version", "insert_plan", "lock_graph", "plan_texts", "version_record"]

_NEW_STATES = (TrialState.WAITING, TrialState.RUNNING, TrialState.REJECTED)
_OPEN_STATES = (TrialState.WAITING.value, TrialState.RUNNING.value)
_MIN_PREFIX = 6
_NUMBER_RETRIES = 20


@lru_cache(maxsize=4096)
def _plan_from_json(text: str) -> Plan:
    """Plans are immutable values: parse each stored one once per process."""
    return Plan.from_json(text)


def _cost(flops: float | None, prompt: float | None, output: float | None, usd: float | None) -> Cost | None:
    if flops is None:
        return None
    return Cost(flops=flops, prompt_tokens=prompt or 0.0, output_tokens=output or 0.0, usd=usd)


def _study_record(row: StudyRow) -> StudyRecord:
    assert row.id is not None
    return StudyRecord(
        study_id=row.id,
        name=row.name,
        strategy=row.strategy,
        strategy_params=row.strategy_params,
        environment=row.environment,
        budget=Budget(limit=row.budget_limit, unit=BudgetUnit(row.budget_unit)),
        seed=row.seed,
        created_at=row.created_at,
        space=row.space,
    )


def version_record(row: GraphVersionRow) -> GraphVersion:
    """A stored version row as the frozen record storage returns."""
    return _graph_version(row)


def _graph_version(row: GraphVersionRow) -> GraphVersion:
    assert row.id is not None
    return GraphVersion(
        version_id=row.id,
        graph=row.graph,
        version=row.version,
        definition=strict_json(row.definition, "definition"),
        cause=row.cause,
        parent_id=row.parent_id,
        pinned=bool(row.pinned),
        created_at=row.created_at,
    )


def _graph_lock_key(graph: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory lock on one graph name."""
    return zlib.crc32(b"allot-graph:" + graph.encode()) - 2**31


def lock_graph(session: Session, graph: str) -> None:
    """Serialise writers of one graph's versions for the rest of the transaction (PostgreSQL advisory
    lock; on SQLite the transaction's ``BEGIN IMMEDIATE`` already did)."""
    if session.get_bind().dialect.name == "postgresql":
        session.exec(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=_graph_lock_key(graph)))


def insert_graph_version(
    session: Session, graph: str, definition: dict[str, Any], cause: str = "", parent_id: int | None = None
) -> GraphVersion:
    """Add the next version of ``graph`` in ``session``'s transaction (hold ``lock_graph`` first)."""
    if parent_id is not None and session.get(GraphVersionRow, parent_id) is None:
        raise KeyError(f"no graph version with id {parent_id}")
    last = session.exec(select(func.max(GraphVersionRow.version)).where(GraphVersionRow.graph == graph)).one()
    row = GraphVersionRow(
        graph=graph,
        version=1 if last is None else last + 1,
        parent_id=parent_id,
        definition=strict_json(definition, "definition"),
        cause=str(cause),
        pinned=False,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    session.refresh(row)
    return _graph_version(row)


def _frozen_trial(row: TrialRow, plan_text: str) -> FrozenTrial:
    assert row.id is not None
    estimated = _cost(row.est_flops, row.est_prompt_tokens, row.est_output_tokens, row.est_usd)
    planner = _cost(row.planner_flops, row.planner_prompt_tokens, row.planner_output_tokens, row.planner_usd)
    return FrozenTrial(
        trial_id=row.id,
        study_id=row.study_id,
        number=row.number,
        state=TrialState(row.state),
        plan=_plan_from_json(plan_text),
        estimated_cost=estimated or Cost(),
        rationale=row.rationale,
        strategy_info=dict(row.strategy_info or {}),
        score=row.score,
        spread=row.spread,
        scores=tuple(float(value) for value in row.scores or ()),
        cost=_cost(row.flops, row.prompt_tokens, row.output_tokens, row.usd),
        prefix_scores={int(k): float(v) for k, v in (row.prefix_scores or {}).items()},
        planner_cost=planner or Cost(),
        error=row.error,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


class SQLStorage(BaseStorage):
    """Studies, trials, plans and graph versions in a SQL database shared by every process that opens the same URL.

    Args:
        url: SQLAlchemy URL; ``None`` means ``default_database_url()`` (``ALLOT_DATABASE_URL`` or
            ``<ALLOT_HOME or cwd>/allot.db``). The schema is created or upgraded on first use.
        engine_kwargs: extra arguments for ``create_engine`` (pool sizes, ``echo``).

    Raises:
        StorageError: the database does not answer, or its schema is newer than this code.
    """

    def __init__(self, url: str | None = None, *, engine_kwargs: dict[str, Any] | None = None) -> None:
        self.url = url or default_database_url()
        self._engine_kwargs = dict(engine_kwargs or {})
        self._engine: Engine = make_engine(self.url, **self._engine_kwargs)
        # One shared connection for in-memory SQLite: serialise its users.
        self._serial: AbstractContextManager[Any] | None = (
            threading.RLock() if isinstance(self._engine.pool, StaticPool) else None
        )
        try:
            ensure_schema(self._engine)
        except BaseException:
            self._engine.dispose()
            raise

    def __repr__(self) -> str:
        return f"SQLStorage({mask_url(self.url)!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Pickle as the URL: a worker process opens its own connections."""
        return {"url": self.url, "engine_kwargs": self._engine_kwargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], engine_kwargs=state["engine_kwargs"])  # type: ignore[misc]

    @property
    def engine(self) -> Engine:
        """The engine, for code that owns other tables of the same schema (jobs, samples, graphs)."""
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def transaction(self, *, write: bool = False) -> AbstractContextManager[Session]:
        """One transaction on Allot's schema, for code that owns other tables of it (jobs, tokens,
        feedback); ``write=True`` takes SQLite's write lock first. Driver failures become ``StorageError``."""
        return self._transaction(write=write)

    @contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[Session]:
        """One session, one transaction; a database that stops answering becomes ``StorageError``."""
        lock = self._serial or nullcontext()
        try:
            with lock, session_scope(self._engine, write=write) as session:
                yield session
        except OperationalError as exc:
            raise storage_error(self._engine, exc) from exc

    # studies

    def create_study(
        self,
        *,
        name: str,
        strategy: str,
        strategy_params: dict[str, Any],
        environment: dict[str, Any],
        budget: Budget,
        seed: int,
        space: dict[str, Any],
    ) -> StudyRecord:
        duplicate = DuplicateStudy(f"a study named {name!r} exists already: resume it or pick another name")
        try:
            with self._transaction(write=True) as session:
                if session.exec(select(StudyRow.id).where(StudyRow.name == name)).first() is not None:
                    raise duplicate
                row = StudyRow(
                    name=name,
                    strategy=strategy,
                    strategy_params=strict_json(strategy_params, "strategy_params"),
                    environment=strict_json(environment, "environment"),
                    budget_limit=budget.limit,
                    budget_unit=budget.unit.value,
                    seed=int(seed),
                    space=strict_json(space, "space"),
                    created_at=utcnow(),
                )
                session.add(row)
                session.flush()
                session.refresh(row)
                return _study_record(row)
        except IntegrityError as exc:  # another process took the name between our check and insert
            raise duplicate from exc

    def get_study(self, study_id: int) -> StudyRecord:
        with self._transaction() as session:
            row = session.get(StudyRow, study_id)
            if row is None:
                raise KeyError(f"no study with id {study_id}")
            return _study_record(row)

    def get_study_by_name(self, name: str) -> StudyRecord:
        with self._transaction() as session:
            row = session.exec(select(StudyRow).where(StudyRow.name == name)).first()
            if row is None:
                raise KeyError(f"no study named {name!r}")
            return _study_record(row)

    def list_studies(self) -> list[StudyRecord]:
        with self._transaction() as session:
            return [_study_record(row) for row in session.exec(select(StudyRow).order_by(col(StudyRow.id)))]

    # trials

    def create_trial(
        self,
        study_id: int,
        *,
        plan: Plan,
        estimated_cost: Cost,
        rationale: str = "",
        strategy_info: dict[str, Any] | None = None,
        planner_cost: Cost | None = None,
        state: TrialState = TrialState.RUNNING,
    ) -> FrozenTrial:
        state = TrialState(state)
        if state not in _NEW_STATES:
            raise ValueError(f"a new trial is waiting, running or rejected, not {state}")
        planner_cost = planner_cost or Cost()
        info = strict_json(strategy_info or {}, "strategy_info")
        plan_text = plan.canonical_json()
        for attempt in range(_NUMBER_RETRIES):
            try:
                with self._transaction(write=True) as session:
                    locked = select(StudyRow.id).where(StudyRow.id == study_id).with_for_update()
                    if session.exec(locked).first() is None:
                        raise KeyError(f"no study with id {study_id}")
                    _insert_plan(session, plan, plan_text)
                    last = session.exec(select(func.max(TrialRow.number)).where(TrialRow.study_id == study_id)).one()
                    now = utcnow()
                    row = TrialRow(
                        study_id=study_id,
                        number=0 if last is None else last + 1,
                        state=state.value,
                        plan_id=plan.plan_id,
                        scores=[],
                        est_flops=estimated_cost.flops,
                        est_prompt_tokens=estimated_cost.prompt_tokens,
                        est_output_tokens=estimated_cost.output_tokens,
                        est_usd=estimated_cost.usd,
                        rationale=rationale,
                        strategy_info=info,
                        planner_flops=planner_cost.flops,
                        planner_prompt_tokens=planner_cost.prompt_tokens,
                        planner_output_tokens=planner_cost.output_tokens,
                        planner_usd=planner_cost.usd,
                        started_at=now if state is TrialState.RUNNING else None,
                        finished_at=now if state is TrialState.REJECTED else None,
                    )
                    session.add(row)
                    session.flush()
                    session.refresh(row)
                    return _frozen_trial(row, plan_text)
            except IntegrityError as exc:  # two writers took the same number: the loser tries again
                if attempt == _NUMBER_RETRIES - 1:
                    raise StorageError(f"could not number a new trial of study {study_id}: {exc.orig}") from exc
        raise AssertionError("unreachable")

    def set_trial_running(self, trial_id: int) -> FrozenTrial:
        with self._transaction(write=True) as session:
            moved = session.exec(
                update(TrialRow)
                .where(col(TrialRow.id) == trial_id, col(TrialRow.state) == TrialState.WAITING.value)
                .values(state=TrialState.RUNNING.value, started_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if moved.rowcount == 0:
                state = session.exec(select(TrialRow.state).where(TrialRow.id == trial_id)).first()
                if state is None:
                    raise KeyError(f"no trial with id {trial_id}")
                raise RuntimeError(f"trial {trial_id} is {state}, not waiting: it cannot start")
            return self._load_trial(session, trial_id)

    def finish_trial(
        self,
        trial_id: int,
        *,
        state: TrialState,
        score: float | None = None,
        spread: float | None = None,
        scores: Iterable[float] = (),
        cost: Cost | None = None,
        error: str | None = None,
        prefix_scores: Mapping[int, float] | None = None,
    ) -> FrozenTrial:
        state = TrialState(state)
        if not state.is_finished:
            raise ValueError(f"a trial finishes as complete, fail or rejected, not {state}")
        checked = finite_scores(score, spread, scores)
        shown = finite_prefix_scores(prefix_scores)
        values: dict[str, Any] = {
            "state": state.value,
            "score": None if score is None else float(score),
            "spread": None if spread is None else float(spread),
            "scores": list(checked),
            "prefix_scores": {str(k): v for k, v in shown.items()} or None,
            "flops": None if cost is None else cost.flops,
            "prompt_tokens": None if cost is None else cost.prompt_tokens,
            "output_tokens": None if cost is None else cost.output_tokens,
            "usd": None if cost is None else cost.usd,
            "error": error,
            "finished_at": utcnow(),
        }
        with self._transaction(write=True) as session:
            finished = session.exec(
                update(TrialRow)
                .where(col(TrialRow.id) == trial_id, col(TrialRow.state).in_(_OPEN_STATES))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if finished.rowcount == 0:
                current = session.exec(select(TrialRow.state).where(TrialRow.id == trial_id)).first()
                if current is None:
                    raise KeyError(f"no trial with id {trial_id}")
                raise RuntimeError(f"trial {trial_id} is already {current}; finished trials are immutable")
            return self._load_trial(session, trial_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._transaction() as session:
            return self._load_trial(session, trial_id)

    def get_trials(self, study_id: int, states: Iterable[TrialState] | None = None) -> list[FrozenTrial]:
        query = (
            select(TrialRow, PlanRow.plan)
            .join(PlanRow, col(PlanRow.plan_id) == col(TrialRow.plan_id))
            .where(TrialRow.study_id == study_id)
            .order_by(col(TrialRow.number))
        )
        if states is not None:
            query = query.where(col(TrialRow.state).in_([TrialState(state).value for state in states]))
        with self._transaction() as session:
            if session.get(StudyRow, study_id) is None:
                raise KeyError(f"no study with id {study_id}")
            return [_frozen_trial(row, text) for row, text in session.exec(query)]

    @staticmethod
    def _load_trial(session: Session, trial_id: int) -> FrozenTrial:
        found = session.exec(
            select(TrialRow, PlanRow.plan)
            .join(PlanRow, col(PlanRow.plan_id) == col(TrialRow.plan_id))
            .where(TrialRow.id == trial_id)
        ).first()
        if found is None:
            raise KeyError(f"no trial with id {trial_id}")
        return _frozen_trial(*found)

    # plans

    def get_plan(self, plan_id: str) -> Plan:
        key = plan_id.strip().lower()
        if len(key) < _MIN_PREFIX or any(char not in string.hexdigits for char in key):
            raise KeyError(f"plan id {plan_id!r}: give the id or at least {_MIN_PREFIX} of its hex characters")
        query = select(PlanRow.plan_id, PlanRow.plan)
        if len(key) == 64:
            query = query.where(PlanRow.plan_id == key)
        else:
            query = query.where(col(PlanRow.plan_id).startswith(key)).limit(2)
        with self._transaction() as session:
            matches = session.exec(query).all()
        if not matches:
            raise KeyError(f"no plan with id {plan_id!r}")
        if len(matches) > 1:
            raise KeyError(f"plan id prefix {plan_id!r} matches several plans: give more characters")
        return _plan_from_json(matches[0][1])

    def add_plan(self, plan: Plan) -> str:
        """Store ``plan`` (once, by its id) without a trial, e.g. the plan a job runs; returns its id."""
        with self._transaction(write=True) as session:
            _insert_plan(session, plan, plan.canonical_json())
        return plan.plan_id

    # graph versions

    def add_graph_version(
        self, graph: str, definition: dict[str, Any], cause: str = "", parent_id: int | None = None
    ) -> GraphVersion:
        if not isinstance(graph, str) or not graph.strip():
            raise ValueError("a graph version needs a non-empty graph name")
        stored = strict_json(definition, "definition")
        for attempt in range(_NUMBER_RETRIES):
            try:
                with self._transaction(write=True) as session:
                    lock_graph(session, graph)
                    return insert_graph_version(session, graph, stored, cause, parent_id)
            except IntegrityError as exc:  # two writers took the same version: the loser tries again
                if attempt == _NUMBER_RETRIES - 1:
                    raise StorageError(f"could not number a new version of graph {graph!r}: {exc.orig}") from exc
        raise AssertionError("unreachable")

    def get_graph_versions(self, graph: str) -> list[GraphVersion]:
        query = select(GraphVersionRow).where(GraphVersionRow.graph == graph).order_by(col(GraphVersionRow.version))
        with self._transaction() as session:
            versions = [_graph_version(row) for row in session.exec(query)]
        if not versions:
            raise KeyError(f"no graph named {graph!r}")
        return versions

    def get_graph_version(self, version_id: int) -> GraphVersion:
        with self._transaction() as session:
            row = session.get(GraphVersionRow, version_id)
            if row is None:
                raise KeyError(f"no graph version with id {version_id}")
            return _graph_version(row)

    def list_graphs(self) -> list[str]:
        with self._transaction() as session:
            return list(session.exec(select(GraphVersionRow.graph).distinct().order_by(col(GraphVersionRow.graph))))

    def set_graph_pinned(self, version_id: int, pinned: bool) -> GraphVersion:
        with self._transaction(write=True) as session:
            changed = session.exec(
                update(GraphVersionRow)
                .where(col(GraphVersionRow.id) == version_id)
                .values(pinned=bool(pinned))
                .execution_options(synchronize_session=False)
            )
            if changed.rowcount == 0:
                raise KeyError(f"no graph version with id {version_id}")
            row = session.get(GraphVersionRow, version_id)
            assert row is not None
            session.refresh(row)
            return _graph_version(row)

    # samples

    def get_samples(self, model: str, prompt_hash: str, params_hash: str, limit: int | None = None) -> list[SampleRecord]:
        query = select(SampleRow).where(
            SampleRow.model == model, SampleRow.prompt_hash == prompt_hash, SampleRow.params_hash == params_hash
        )
        if limit is not None:
            query = query.where(col(SampleRow.sample_index) < limit)
        with self._transaction() as session:
            return [_sample_record(row) for row in session.exec(query.order_by(col(SampleRow.sample_index)))]

    def add_samples(self, samples: Iterable[SampleRecord]) -> int:
        rows = [_sample_values(sample) for sample in samples]
        if not rows:
            return 0
        table = SampleRow.__table__
        keys = ["model", "prompt_hash", "params_hash", "sample_index"]
        with self._transaction(write=True) as session:
            relax_commit(session)
            dialect = session.get_bind().dialect.name
            if dialect in ("postgresql", "sqlite"):
                insert = pg_insert if dialect == "postgresql" else sqlite_insert
                added = 0
                for start in range(0, len(rows), 500):  # well below SQLite's bound on query parameters
                    chunk = rows[start : start + 500]
                    statement = insert(table).values(chunk).on_conflict_do_nothing(index_elements=keys)
                    added += len(session.exec(statement.returning(table.c.id)).all())
                return added
            added = 0
            for values in rows:
                exists = session.exec(select(SampleRow.id).where(*(getattr(SampleRow, k) == values[k] for k in keys))).first()
                if exists is None:
                    session.add(SampleRow(**values))
                    added += 1
            return added


def _sample_record(row: SampleRow) -> SampleRecord:
    return SampleRecord(
        model=row.model,
        prompt_hash=row.prompt_hash,
        params_hash=row.params_hash,
        sample_index=row.sample_index,
        text=row.text,
        prompt_tokens=row.prompt_tokens,
        output_tokens=row.output_tokens,
        latency_s=row.latency_s,
        usd=row.usd,
    )


def _sample_values(sample: SampleRecord) -> dict[str, Any]:
    if sample.sample_index < 0:
        raise ValueError(f"sample_index must be >= 0, got {sample.sample_index}")
    if not sample.model or not sample.prompt_hash or not sample.params_hash:
        raise ValueError("a sample needs a model, a prompt hash and a params hash")
    return {
        "model": sample.model,
        "prompt_hash": sample.prompt_hash,
        "params_hash": sample.params_hash,
        "sample_index": int(sample.sample_index),
        "text": sample.text,
        "prompt_tokens": int(sample.prompt_tokens),
        "output_tokens": int(sample.output_tokens),
        "latency_s": sample.latency_s,
        "usd": sample.usd,
        "created_at": utcnow(),
    }


@lru_cache(maxsize=4096)
def plan_texts(plan: Plan) -> tuple[str, str]:
    """A plan's canonical JSON and summary (plans are values: computed once per process)."""
    return plan.canonical_json(), plan.summary()


_PLAN_INSERTS = {
    name: insert(PlanRow.__table__)  # type: ignore[attr-defined]
    .values(plan_id=bindparam("p_id"), plan=bindparam("p_text"), summary=bindparam("p_summary"), created_at=bindparam("p_at"))
    .on_conflict_do_nothing(index_elements=["plan_id"])
    for name, insert in (("postgresql", pg_insert), ("sqlite", sqlite_insert))
}
"""``INSERT ... ON CONFLICT DO NOTHING`` of a plan, built once per dialect (jobs store one each)."""


def insert_plan(session: Session, plan: Plan) -> None:
    """Store ``plan`` in ``session``'s transaction unless it is stored already (plans are values)."""
    text, summary = plan_texts(plan)
    statement = _PLAN_INSERTS.get(session.get_bind().dialect.name)
    if statement is not None:
        values = {"p_id": plan.plan_id, "p_text": text, "p_summary": summary, "p_at": utcnow()}
        session.connection().execute(statement, values)
    else:
        _insert_plan(session, plan, text)


def _insert_plan(session: Session, plan: Plan, plan_text: str) -> None:
    """Store the plan unless a plan with its id is there already (then it is this very plan)."""
    values = {
        "plan_id": plan.plan_id,
        "plan": plan_text,
        "summary": plan.summary(),
        "created_at": utcnow(),
    }
    table = PlanRow.__table__
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.exec(pg_insert(table).values(**values).on_conflict_do_nothing(index_elements=["plan_id"]))
    elif dialect == "sqlite":
        session.exec(sqlite_insert(table).values(**values).on_conflict_do_nothing(index_elements=["plan_id"]))
    elif session.get(PlanRow, plan.plan_id) is None:
        session.add(PlanRow(**values))
        session.flush()
