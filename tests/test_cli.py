"""The ``allot`` console script end to end: real subprocesses, real databases, real signals.

Every command runs with cwd and ``ALLOT_HOME`` = the test's ``tmp_path`` and ``ALLOT_DATABASE_URL`` set by the
test, and with a timeout. Covered: the main job (search, tables, resume, plan inspection) on SQLite and
PostgreSQL; bad input (one ``error:`` line, nothing stored changes); Ctrl-C and kill -9 mid-study, then
resume; reproducibility; ``--queue`` with an ``allot worker``; ``allot db upgrade``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from executors.replay_data import bundled_data_dir
from planner.storage import BaseStorage, get_storage
from planner.trial import FrozenTrial, TrialState

ALLOT = Path(sys.executable).with_name("allot")
RUN_S = 120.0  # any single command
QUICK_S = 60.0
DEMO = ["study", "run", "--name", "demo", "--budget-fraction", "0.05", "--trials", "12"]
LONG = ["study", "run", "--name", "long", "--strategy", "grid", "--budget-fraction", "0.5", "--trials", "4000"]
EVALUATED = (TrialState.COMPLETE, TrialState.FAIL)


# -- helpers ----------------------------------------------------------------------------------------------


def _env(home: Path, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOT_") and k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(
        ALLOT_HOME=str(home),
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        COLUMNS="200",  # wide tables: one plan per line
        NO_COLOR="1",
    )
    if database_url is not None:
        env["ALLOT_DATABASE_URL"] = database_url
    return env


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"allot {' '.join(self.args)} -> {self.returncode}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def allot(home: Path, database_url: str | None, *args: str, timeout: float = RUN_S) -> Result:
    assert ALLOT.exists(), f"console script {ALLOT} is not installed (pip install -e .)"
    done = subprocess.run(
        [str(ALLOT), *args], cwd=home, env=_env(home, database_url), capture_output=True, text=True, timeout=timeout
    )
    return Result(list(args), done.returncode, done.stdout, done.stderr)


def ok(home: Path, database_url: str | None, *args: str, timeout: float = RUN_S) -> Result:
    result = allot(home, database_url, *args, timeout=timeout)
    assert result.returncode == 0, str(result)
    assert "Traceback" not in result.stderr, str(result)
    return result


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def trials_of(storage: BaseStorage, name: str) -> list[FrozenTrial]:
    try:
        record = storage.get_study_by_name(name)
    except KeyError:
        return []
    return storage.get_trials(record.study_id)


def evaluated(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state in EVALUATED]


def snapshot(trials: list[FrozenTrial]) -> list[tuple]:
    """What must not change: every trial's identity, state and results."""
    return [(t.trial_id, t.number, t.state, t.plan_id, t.score, t.scores, t.cost, t.finished_at) for t in trials]


def table_rows(text: str) -> list[list[str]]:
    """Body rows of the rich tables in ``text``, as lists of stripped cells."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]


def section(text: str, title: str) -> str:
    """The lines of ``text`` from the line holding ``title`` to the end of that table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("└"))
    return "\n".join(lines[start : end + 1])


# -- 1, 2: the main job ---------------------------------------------------------------------------------


@pytest.fixture(params=[pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "allot.db")
    factory: Callable[[], str] = request.getfixturevalue("postgres_database_factory")
    return factory()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_main_job_runs_shows_and_resumes(tmp_path: Path, database_url: str) -> None:
    run = ok(tmp_path, database_url, *DEMO)
    out = run.stdout
    assert "Study demo: aime24, 8,456 plans in the space" in out, out
    assert "Best plans of demo" in out, out
    best_rows = table_rows(section(out, "Best plans of demo"))
    assert 1 <= len(best_rows) <= 5, out
    assert all(re.fullmatch(r"\d+", row[0]) and re.fullmatch(r"[01]\.\d{3}", row[1]) for row in best_rows), best_rows
    front = table_rows(section(out, "Pareto front"))
    assert front, out
    costs = [float(row[2]) for row in front]
    scores = [float(row[1]) for row in front]
    assert costs == sorted(costs) and scores == sorted(scores), front  # cheapest first, each better than the last
    versus = table_rows(section(out, "best single-model plan"))
    assert [row[0] for row in versus] == ["Allot", "single model"], out
    assert "answer: Qwen3-" in versus[1][3], versus
    assert "Gain over the single-model baseline" in out
    match = re.search(r"allot plan show ([0-9a-f]{12})\s*$", out)
    assert match, out
    prefix = match.group(1)

    storage = get_storage(database_url)
    trials = trials_of(storage, "demo")
    assert len(evaluated(trials)) == 12, [t.state for t in trials]
    assert all(t.state.is_finished for t in trials)
    assert [t.number for t in trials] == list(range(len(trials)))
    complete = [t for t in trials if t.state is TrialState.COMPLETE]
    best = next(t for t in complete if t.plan_id.startswith(prefix))
    assert best.score == max(t.score or 0 for t in complete)
    assert f"{best.score:.3f}" == best_rows[0][1]
    if database_url.startswith("sqlite"):
        assert (tmp_path / "allot.db").is_file()

    listed = ok(tmp_path, database_url, "study", "list", timeout=QUICK_S)
    rows = [row for row in table_rows(listed.stdout) if row[0] == "demo"]
    assert len(rows) == 1, listed.stdout
    strategy = storage.get_study_by_name("demo").strategy  # the default strategy
    assert (rows[0][1], rows[0][2], rows[0][5]) == ("aime24", strategy, "12"), rows
    assert rows[0][6] == f"{best.score:.3f}", rows

    shown = ok(tmp_path, database_url, "study", "show", "demo", timeout=QUICK_S)
    assert f"demo: strategy {strategy} (seed 0)" in shown.stdout, shown.stdout
    trial_rows = table_rows(section(shown.stdout, "Trials"))
    assert [row[0] for row in trial_rows] == [str(t.number) for t in trials], shown.stdout
    assert "Pareto front" in shown.stdout

    tree = ok(tmp_path, database_url, "plan", "show", prefix, timeout=QUICK_S)
    assert f"plan {prefix}" in tree.stdout
    assert "stage answer decides by majority_vote" in tree.stdout, tree.stdout
    assert re.search(r"n0: solver Qwen3-[\d.]+B x \d+ \(T=", tree.stdout), tree.stdout
    assert "→ decision" in tree.stdout

    as_json = ok(tmp_path, database_url, "plan", "show", prefix, "--json", timeout=QUICK_S)
    text = as_json.stdout.strip()
    assert hashlib.sha256(text.encode()).hexdigest().startswith(prefix)
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(text.encode()).hexdigest() == best.plan_id

    before = snapshot(trials)
    again = ok(tmp_path, database_url, *DEMO)
    assert "Resuming study demo (12 evaluated trials stored)" in again.stdout, again.stdout
    assert snapshot(trials_of(storage, "demo")) == before  # nothing new, nothing changed
    assert f"allot plan show {prefix}" in again.stdout

    more = ok(tmp_path, database_url, *DEMO[:-1], "16")
    assert "Resuming study demo" in more.stdout
    after = trials_of(storage, "demo")
    assert len(evaluated(after)) == 16
    assert all(t.state.is_finished for t in after)
    assert snapshot(after)[: len(before)] == before
    assert [t.number for t in after] == list(range(len(after)))
    assert [s.name for s in storage.list_studies()] == ["demo"]
    storage.close()


# -- 3: bad input -------------------------------------------------------------------------------------------

SECRET = "sk-live-9f8e7d6c5b4a"


@dataclass(frozen=True)
class Bad:
    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]  # substrings of the error line
    database_url: str | None = None  # None: the database holding "keep"
    forbidden: tuple[str, ...] = ()


def _write_bad_inputs(root: Path) -> None:
    (root / "bad.yaml").write_text("models: [\n  Qwen3-8B: {params_b: 8\n")
    (root / "negative.yaml").write_text("models:\n  Qwen3-8B: {params_b: -8, layers: 36, hidden: 4096}\n")
    (root / "keyed.yaml").write_text(f"models:\n  Qwen3-8B: {{params_b: 8.2, api_key: {SECRET}}}\n")
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no replay files here\n")
    with gzip.open(bundled_data_dir() / "aime24__Qwen3-0.6B.jsonl.gz", "rt", encoding="utf-8") as handle:
        lines = [next(handle) for _ in range(3)]
    (root / "broken").mkdir()
    (root / "broken" / "mini__Qwen3-0.6B.jsonl").write_text("".join(lines) + '{"id": "mini-4", "gold": \n')
    (root / "sizeless").mkdir()
    (root / "sizeless" / "mini__mystery-model.jsonl").write_text("".join(lines))


BASE = ("study", "run", "--name", "bad", "--trials", "2")
FRACTION = ("--budget-fraction", "0.05")
BAD_INPUTS = [
    Bad("catalog-invalid-yaml", (*FRACTION, "--catalog", "bad.yaml"), ("bad.yaml", "not valid YAML")),
    Bad("catalog-negative-size", (*FRACTION, "--catalog", "negative.yaml"), ("negative.yaml", "Qwen3-8B", "params_b")),
    Bad("catalog-api-key", (*FRACTION, "--catalog", "keyed.yaml"), ("keyed.yaml", "api_key"), forbidden=(SECRET,)),
    Bad("unknown-model", (*FRACTION, "--models", "Qwen3-8B,Nope-9B"), ("unknown model", "Nope-9B")),
    Bad("budget-below-cheapest", ("--budget", "0.001"), ("below the cheapest plan",)),
    Bad("data-missing", (*FRACTION, "--data", "no/such/dir"), ("no/such/dir", "does not exist")),
    Bad("data-no-replay-files", (*FRACTION, "--data", "empty"), ("no replay files", "empty")),
    Bad("data-malformed-line", (*FRACTION, "--data", "broken"), ("mini__Qwen3-0.6B.jsonl:4", "not valid JSON")),
    Bad("model-without-size", (*FRACTION, "--data", "sizeless"), ("mystery-model", "models.json")),
    Bad("unknown-strategy", (*FRACTION, "--strategy", "annealing"), ("unknown strategy", "annealing")),
    Bad("markup-in-input", (*FRACTION, "--strategy", "[/x]"), ("unknown strategy '[/x]'",)),
    Bad("unknown-unit", ("--budget", "100", "--unit", "parsecs"), ("parsecs",)),
    Bad("no-budget", (), ("no budget",)),
    Bad(
        "postgres-down",
        FRACTION,
        ("cannot reach the database", "postgresql+psycopg://postgres@127.0.0.1:1/x"),
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/x",
    ),
    Bad(
        "postgres-down-password-masked",
        FRACTION,
        ("cannot reach the database", "postgresql+psycopg://u:***@127.0.0.1:1/x"),
        database_url="postgresql+psycopg://u:hunter2@127.0.0.1:1/x",
        forbidden=("hunter2",),
    ),
    Bad(
        "postgres-down-password-masked-option",
        (*FRACTION, "--database", "postgresql+psycopg://u:hunter2@127.0.0.1:1/x"),
        ("cannot reach the database", "u:***@127.0.0.1:1/x"),
        forbidden=("hunter2",),
    ),
    Bad(
        "sqlite-missing-directory",
        FRACTION,
        ("cannot open the database", "does not exist"),
        database_url="sqlite:///{home}/missing/dir/allot.db",
    ),
]


@pytest.fixture(scope="module")
def kept_study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, list[tuple]]]:
    """A home with the bad inputs and a database holding a finished study "keep", and its snapshot."""
    home = tmp_path_factory.mktemp("bad-input")
    _write_bad_inputs(home)
    url = sqlite_url(home / "allot.db")
    ok(home, url, "study", "run", "--name", "keep", "--strategy", "random", "--budget-fraction", "0.05", "--trials", "3")
    storage = get_storage(url)
    before = snapshot(trials_of(storage, "keep"))
    storage.close()
    assert len(before) >= 3
    yield home, url, before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.id for b in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_changes_nothing(bad: Bad, kept_study: tuple[Path, str, list[tuple]]) -> None:
    home, url, before = kept_study
    database_url = url if bad.database_url is None else bad.database_url.format(home=home)
    result = allot(home, database_url, *BASE, *bad.args, timeout=QUICK_S)

    assert result.returncode != 0, str(result)
    assert "Traceback" not in result.stderr + result.stdout, str(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), str(result)
    for expected in bad.expect:
        assert expected in lines[0], str(result)
    for secret in bad.forbidden:
        assert secret not in result.stdout + result.stderr, str(result)

    storage = get_storage(url)
    try:
        assert [s.name for s in storage.list_studies()] == ["keep"]  # no half-made study "bad"
        assert snapshot(trials_of(storage, "keep")) == before
    finally:
        storage.close()


# -- 4: interruption, kill -9, resume; reproducibility -------------------------------------------------------


def _default_sigint() -> None:
    """In the child: Ctrl-C back to its default. A shell without job control starts background commands with
    SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt handler: a suite run
    in the background would test nothing about Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(home: Path, database_url: str, args: list[str], log: str) -> subprocess.Popen[bytes]:
    with open(home / f"{log}.out", "wb") as out, open(home / f"{log}.err", "wb") as err:
        return subprocess.Popen(
            [str(ALLOT), *args],
            cwd=home,
            env=_env(home, database_url),
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill a process we started (and its session) if it is still running."""
    if process.poll() is None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=QUICK_S)


def _wait_for_trials(home: Path, database_url: str, process: subprocess.Popen[bytes], name: str, at_least: int) -> int:
    """Poll the database until the study has ``at_least`` trials stored; fail if the process ends first."""
    deadline = time.monotonic() + RUN_S
    db_file = Path(database_url.removeprefix("sqlite:///"))
    while not db_file.exists():  # let the CLI create the database before we open it
        assert process.poll() is None, (home / "run.err").read_text()
        assert time.monotonic() < deadline, "the database was never created"
        time.sleep(0.05)
    storage = get_storage(database_url)
    try:
        while True:
            count = len(trials_of(storage, name))
            if count >= at_least:
                return count
            assert process.poll() is None, f"allot exited with {process.returncode} after {count} trials"
            assert time.monotonic() < deadline, f"only {count} trials after {RUN_S} s"
            time.sleep(0.05)
    finally:
        storage.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_interrupt_and_kill_then_resume(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "allot.db")

    # Ctrl-C: exit 130, a resume hint, every stored trial finished but at most the one in flight.
    process = _start(tmp_path, url, LONG, "run")
    try:
        _wait_for_trials(tmp_path, url, process, "long", 30)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=QUICK_S) == 130, (tmp_path / "run.err").read_text()
    finally:
        _stop(process)
    err = (tmp_path / "run.err").read_text()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "allot study run --name long" in lines[0] and "resume" in lines[0].lower(), err
    storage = get_storage(url)
    interrupted = trials_of(storage, "long")
    assert len(interrupted) >= 30
    assert sum(not t.state.is_finished for t in interrupted) <= 1, [t.state for t in interrupted]
    assert all(t.state.is_finished for t in interrupted[:-1])

    # kill -9 in the middle of a trial: freeze the run until the database shows one in flight, then kill it.
    process = _start(tmp_path, url, LONG, "run")
    try:
        _wait_for_trials(tmp_path, url, process, "long", 60)
        deadline = time.monotonic() + 30
        while True:
            os.killpg(process.pid, signal.SIGSTOP)
            if not trials_of(storage, "long")[-1].state.is_finished:
                break
            os.killpg(process.pid, signal.SIGCONT)
            assert time.monotonic() < deadline, "never saw a trial in flight"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait(timeout=QUICK_S) == -signal.SIGKILL
    finally:
        _stop(process)
    killed = trials_of(storage, "long")
    assert len(killed) >= 60
    in_flight = [t for t in killed if not t.state.is_finished]
    assert in_flight == [killed[-1]], [t.state for t in killed]
    done = len(evaluated(killed))

    # Resume to exactly 20 more evaluated trials; leftovers are evaluated first and count.
    resumed = ok(tmp_path, url, *LONG[:-1], str(done + 20))
    assert f"Resuming study long ({done} evaluated trials stored)" in resumed.stdout, resumed.stdout
    final = trials_of(storage, "long")
    storage.close()
    assert [t.number for t in final] == list(range(len(final)))  # no gaps, no duplicates
    assert all(t.state.is_finished for t in final), [(t.number, t.state) for t in final if not t.state.is_finished]
    assert len(evaluated(final)) == done + 20  # --trials is a total: the trial in flight counts toward it
    assert final[in_flight[0].number].plan_id == in_flight[0].plan_id  # ... and was evaluated, not replaced
    assert len({t.plan_id for t in final}) == len(final)  # grid never repeats a plan, even across runs
    kept = [t for t in killed if t.state.is_finished]
    assert snapshot([final[t.number] for t in kept]) == snapshot(kept)  # finished trials never change


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_same_seed_same_study(tmp_path: Path) -> None:
    runs = []
    for name in ("first", "second"):
        url = sqlite_url(tmp_path / f"{name}.db")
        ok(tmp_path, url, "study", "run", "--name", "r", "--strategy", "random", "--seed", "3", "--budget-fraction", "0.05",
           "--trials", "15")  # fmt: skip
        storage = get_storage(url)
        trials = trials_of(storage, "r")
        storage.close()
        assert len(evaluated(trials)) == 15
        runs.append([(t.number, t.plan_id, t.state, t.score, t.scores, t.estimated_cost, t.cost) for t in trials])
    assert runs[0] == runs[1]


# -- 5: the queue through the CLI ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_queue_with_a_cli_worker(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "allot.db")
    worker = _start(tmp_path, url, ["worker"], "worker")
    try:
        run = allot(
            tmp_path, url, "study", "run", "--queue", "--name", "q", "--budget-fraction", "0.05", "--trials", "6", "--batch", "3"
        )
        log = (tmp_path / "worker.err").read_text() + (tmp_path / "worker.out").read_text()
        assert run.returncode == 0, f"{run}\n--- worker ---\n{log[-4000:]}"
        assert "Show the winning graph" in run.stdout
        worker.terminate()  # warm shutdown
        assert worker.wait(timeout=30) == 0, log[-4000:]
    finally:
        _stop(worker)
    log = (tmp_path / "worker.err").read_text() + (tmp_path / "worker.out").read_text()
    storage = get_storage(url)
    trials = trials_of(storage, "q")
    storage.close()
    assert len([t for t in trials if t.state is TrialState.COMPLETE]) == 6, [(t.state, t.error) for t in trials]
    assert all(t.state in (TrialState.COMPLETE, TrialState.REJECTED) for t in trials)
    assert len(re.findall(r"Task allot\.evaluate_trial\[[^\]]+\] succeeded", log)) == 6, log[-4000:]  # the worker ran them
    assert not list((tmp_path / ".allot" / "broker" / "queue").glob("*.msg"))


# -- 6: db upgrade ----------------------------------------------------------------------------------------


def _tables(path: Path) -> tuple[set[str], str | None]:
    engine = create_engine(sqlite_url(path))
    try:
        names = set(inspect(engine).get_table_names())
        with engine.connect() as connection:
            version = connection.exec_driver_sql("SELECT version_num FROM allot_alembic_version").scalar()
    finally:
        engine.dispose()
    return names, version


@pytest.mark.timeout(60)
def test_db_upgrade_creates_tables_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    first = ok(tmp_path, sqlite_url(path), "db", "upgrade", timeout=QUICK_S)
    assert "up to date" in first.stdout
    tables, version = _tables(path)
    assert "allot_alembic_version" in tables and version
    assert len(tables) > 1, tables
    ok(tmp_path, sqlite_url(path), "db", "upgrade", timeout=QUICK_S)
    assert _tables(path) == (tables, version)

    # Without ALLOT_DATABASE_URL the database is $ALLOT_HOME/allot.db.
    home = tmp_path / "home"
    home.mkdir()
    ok(home, None, "db", "upgrade", timeout=QUICK_S)
    assert _tables(home / "allot.db") == (tables, version)
