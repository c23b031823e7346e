"""The review page in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``; ``make test``
installs them), driven by selenium, against ``allot serve`` running as a real process on a real database:
a SQLite file holding a replay study and a learned graph (``review_sqlite_template``), and once PostgreSQL.

The browser resolves no host name except the loopback server's (``--host-resolver-rules``), so a page that
needed the network would fail here; every resource it loaded is checked to come from the server, and the
browser's console must stay free of errors. Screenshots go to ``artifacts/screenshots/`` (gitignored).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from planner.storage import BaseStorage, get_storage
from planner.study import load_study

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ALLOT = Path(sys.executable).with_name("allot")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
TOKEN = "browser-test-token"
WAIT_S = 20.0

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.fail("Chromium is missing: `make test` installs it (apt-get install chromium chromium-driver)", pytrace=False)


# -- the server and the browser -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``allot serve`` on a free loopback port, over ``url``; stopped by ``close``."""

    def __init__(self, url: str, log: Path) -> None:
        self.database = url
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOT_")}
        env.update(ALLOT_DATABASE_URL=url, ALLOT_WRITE_TOKEN=TOKEN, LITELLM_LOCAL_MODEL_COST_MAP="True", NO_COLOR="1")
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [str(ALLOT), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/api/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"allot serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)

    def storage(self) -> BaseStorage:
        return get_storage(self.database)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="allot-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
        # no name resolves but the loopback server: a page that needed the network would break here
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, review_sqlite_template: Path) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("review-browser")
    path = folder / "review.db"
    shutil.copy(review_sqlite_template, path)
    server = Server(f"sqlite:///{path}", folder / "serve.log")
    try:
        yield server
    finally:
        server.close()


# -- helpers ---------------------------------------------------------------------------------------------------


class NavigationTolerantWait(WebDriverWait):
    """A wait whose condition may run while a form post replaces the page: Chromium then reports an element
    found in the old document as "Node with given id does not belong to the document" (a plain
    WebDriverException, not the stale-element one WebDriverWait already ignores); poll again instead."""

    def until(self, method: Callable[[WebDriver], object], message: str = "") -> object:  # type: ignore[override]
        def tolerant(driver: WebDriver) -> object:
            try:
                return method(driver)
            except WebDriverException as exc:
                if "does not belong to the document" in (exc.msg or ""):
                    return False
                raise

        return super().until(tolerant, message)


def wait(browser: WebDriver) -> WebDriverWait:
    return NavigationTolerantWait(browser, WAIT_S)


def open_page(browser: WebDriver, server: Server, path: str) -> None:
    browser.get(server.base + path)
    wait(browser).until(lambda b: b.execute_script("return document.readyState") == "complete")


def check_offline(browser: WebDriver, server: Server) -> None:
    """Everything the page loaded came from the server; no script or stylesheet points elsewhere; the
    browser logged no error."""
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources, "the page loaded its scripts and styles from the server"
    assert [r for r in resources if not r.startswith(server.base + "/")] == []
    html = browser.page_source
    for url in re.findall(r"""<(?:script|link|img|iframe)[^>]+(?:src|href)\s*=\s*["']([^"']+)""", html):
        assert not re.match(r"(https?:)?//", url) or url.startswith("http://127.0.0.1"), url
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def screenshot(browser: WebDriver, name: str) -> Path:
    """A full-page screenshot under artifacts/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(max(int(height) + 40, 600), 4000))
    path = SCREENSHOTS / f"{name}.png"
    browser.save_screenshot(str(path))
    browser.set_window_size(1400, 1000)
    assert path.read_bytes().startswith(b"\x89PNG")
    return path


def plots_drawn(browser: WebDriver, count: int) -> None:
    wait(browser).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".js-plotly-plot svg.main-svg")) >= count)


def column(browser: WebDriver, table: str, index: int) -> list[str]:
    rows = browser.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
    return [r.find_elements(By.TAG_NAME, "td")[index].text for r in rows if r.is_displayed()]


# -- pages -------------------------------------------------------------------------------------------------------


def test_waits_poll_again_while_a_post_replaces_the_page_and_fail_on_other_errors() -> None:
    """The wait helper itself, without a browser: the navigation race is retried, any other driver error is not."""
    calls: list[int] = []

    def racing(driver: object) -> bool:
        calls.append(1)
        if len(calls) < 3:
            raise WebDriverException('inspector error: {"message":"Node with given id does not belong to the document"}')
        return True

    assert NavigationTolerantWait(object(), 2.0, poll_frequency=0.01).until(racing) is True  # type: ignore[arg-type]
    assert len(calls) == 3

    def broken(driver: object) -> bool:
        raise WebDriverException("chrome not reachable")

    with pytest.raises(WebDriverException, match="chrome not reachable"):
        NavigationTolerantWait(object(), 2.0, poll_frequency=0.01).until(broken)  # type: ignore[arg-type]


def test_studies_page(browser: WebDriver, server: Server) -> None:
    storage = server.storage()
    try:
        counts = {r.name: len(storage.get_trials(r.study_id)) for r in storage.list_studies()}
    finally:
        storage.close()
    open_page(browser, server, "/")
    rows = {r.find_element(By.TAG_NAME, "td").text: r for r in browser.find_elements(By.CSS_SELECTOR, "#studies tbody tr")}
    assert set(rows) == {"aime", "graphs"}
    for name, row in rows.items():
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        assert cells[4] == str(counts[name])
    assert "No jobs yet" in browser.find_element(By.TAG_NAME, "main").text
    check_offline(browser, server)
    screenshot(browser, "studies")


def test_study_page(browser: WebDriver, server: Server) -> None:
    storage = server.storage()
    try:
        study = load_study("aime", storage)
        trials, best, front = study.trials, study.best_trial, study.pareto_trials()
    finally:
        storage.close()
    open_page(browser, server, "/")
    browser.find_element(By.LINK_TEXT, "aime").click()
    wait(browser).until(ec.url_contains("/studies/aime"))
    assert browser.find_element(By.ID, "study-name").text == "aime"
    assert browser.find_element(By.ID, "trial-count").text == str(len(trials))
    assert browser.find_element(By.ID, "best-plan-link").text == best.plan.summary()
    assert f"{best.score:.3f}" in browser.find_element(By.ID, "card-best").text
    plots_drawn(browser, 2)
    scatter = browser.find_element(By.ID, "plot-scatter")
    assert "Pareto front" in scatter.text and "Score vs cost" in scatter.text
    # the front is drawn as its own trace, one point per Pareto trial
    points = browser.execute_script(
        "return document.getElementById('plot-scatter').data.find(t => t.name === 'Pareto front').x.length"
    )
    assert points == len(front)
    assert "Best score so far" in browser.find_element(By.ID, "plot-history").text
    assert len(column(browser, "trials", 0)) == len(trials)
    # sort by score, descending: the best trial first
    header = browser.find_element(By.XPATH, "//table[@id='trials']//th[text()='score']")
    header.click()
    header.click()
    assert header.get_attribute("aria-sort") == "descending"
    assert column(browser, "trials", 2)[0] == f"{best.score:.3f}"
    tied = {str(t.number) for t in trials if t.score is not None and f"{t.score:.3f}" == f"{best.score:.3f}"}
    assert column(browser, "trials", 0)[0].split()[0] in tied  # the best trial, or one tied with it
    # filter by text, then by state
    model = best.plan.stages[0].nodes[0].model
    box = browser.find_element(By.ID, "trial-filter")
    box.send_keys(model)
    expected = [t for t in trials if model in t.plan.summary() or model in t.rationale]
    assert len(column(browser, "trials", 0)) == len(expected)
    assert f"{len(expected)} of {len(trials)} shown" in browser.find_element(By.CSS_SELECTOR, "[data-count-for=trials]").text
    box.clear()
    Select(browser.find_element(By.ID, "state-filter")).select_by_value("complete")
    assert set(column(browser, "trials", 1)) == {"complete"}
    # the planner's cost is shown beside the evaluation's
    assert "planner tokens" in browser.find_element(By.CSS_SELECTOR, "#trials thead").text
    assert "PLANNER LLM COST" in browser.find_element(By.ID, "card-planner-cost").text.upper()
    check_offline(browser, server)
    Select(browser.find_element(By.ID, "state-filter")).select_by_value("")
    screenshot(browser, "study")


def test_plan_page_draws_the_best_plan(browser: WebDriver, server: Server) -> None:
    storage = server.storage()
    try:
        best = load_study("graphs", storage).best_trial
    finally:
        storage.close()
    open_page(browser, server, "/studies/graphs")
    browser.find_element(By.ID, "best-plan-link").click()
    wait(browser).until(ec.url_contains(f"/plans/{best.plan_id}"))
    assert browser.find_element(By.ID, "plan-summary").text == best.plan.summary()
    drawings = browser.find_elements(By.CSS_SELECTOR, "svg.allot-graph")
    assert len(drawings) == len(best.plan.stages)
    for svg, stage in zip(drawings, best.plan.stages, strict=True):
        labels = svg.find_elements(By.CSS_SELECTOR, "g.node")
        texts = [label.text for label in labels]
        assert len(labels) == len(stage.nodes) + 1  # and the decision
        for node in stage.nodes:
            assert any(node.role.value in t and node.model in t and f"n = {node.n}" in t for t in texts), texts
        assert any("decision" in t for t in texts)
        assert len(svg.find_elements(By.CSS_SELECTOR, "g.edge")) == len(stage.edges) + len(stage.answer_nodes)
    check_offline(browser, server)
    screenshot(browser, "plan")


def test_graph_versions_and_diff(browser: WebDriver, server: Server) -> None:
    storage = server.storage()
    try:
        versions = storage.get_graph_versions("graphs")
    finally:
        storage.close()
    last = len(versions)
    open_page(browser, server, "/studies/graphs")
    browser.find_element(By.LINK_TEXT, "graphs").click()
    wait(browser).until(ec.url_contains("/graphs/graphs"))
    assert browser.find_element(By.ID, "version-title").text == f"version {last} of {last}"
    assert versions[-1].cause[:60] in browser.find_element(By.ID, "cause").text
    svg = browser.find_element(By.CSS_SELECTOR, "svg.allot-graph")
    texts = " ".join(n.text for n in svg.find_elements(By.CSS_SELECTOR, "g.node"))
    for model in ("sim-1B", "sim-70B"):
        assert model in texts
    assert "solver" in texts
    check_offline(browser, server)
    screenshot(browser, "graph-latest")
    browser.find_element(By.ID, "prev-version").click()
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "version-title"), f"version {last - 1} of {last}"))
    assert versions[-2].cause[:60] in browser.find_element(By.ID, "cause").text
    browser.find_element(By.ID, "next-version").click()
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "version-title"), f"version {last} of {last}"))
    # what changed from the version before, and why: the last update moved edges, drawn and labelled
    browser.find_element(By.ID, "diff-prev").click()
    wait(browser).until(ec.url_contains("/diff"))
    assert browser.find_element(By.ID, "diff-title").text == f"graphs: v{last - 1} → v{last}"
    assert versions[-1].cause[:60] in browser.find_element(By.ID, "causes").text
    rows = browser.find_elements(By.CSS_SELECTOR, ".edge-changes tbody tr")
    assert rows, "the last update moved an edge"
    labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "svg.allot-graph g.edge-label")]
    assert any("→" in label for label in labels)
    check_offline(browser, server)
    screenshot(browser, "graph-diff")
    # a diff picked from the history form
    open_page(browser, server, "/graphs/graphs/versions/1")
    Select(browser.find_element(By.ID, "diff-b")).select_by_value(str(last))
    browser.find_element(By.ID, "diff-button").click()
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "diff-title"), f"v1 → v{last}"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#causes li")) == last - 1


def test_pin_and_rollback_need_the_token(browser: WebDriver, server: Server) -> None:
    def state() -> list[tuple[int, bool, str]]:
        storage = server.storage()
        try:
            return [(v.version, v.pinned, v.cause) for v in storage.get_graph_versions("graphs")]
        finally:
            storage.close()

    before = state()
    last = len(before)
    open_page(browser, server, "/graphs/graphs/versions/2")
    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.ID, "pin-button").click()
    wait(browser).until(ec.presence_of_element_located((By.ID, "error-detail")))
    assert "403" in browser.find_element(By.TAG_NAME, "h1").text
    assert "wrong write token" in browser.find_element(By.ID, "error-detail").text
    assert state() == before
    browser.get_log("browser")  # the 403 was expected: clear it from the log

    open_page(browser, server, "/graphs/graphs/versions/2")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "pin-button").click()
    wait(browser).until(ec.presence_of_element_located((By.ID, "pinned-badge")))
    assert [p for _, p, _ in state()] == [v == 2 for v, _, _ in before]
    assert browser.find_element(By.ID, "pin-button").text == "Unpin v2"
    screenshot(browser, "graph-pinned")

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "rollback-button").click()
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "version-title"), f"version {last + 1} of {last + 1}"))
    assert "rollback to v2" in browser.find_element(By.ID, "cause").text
    after = state()
    assert after[:last] == [(v, v == 2, c) for v, _, c in before] and after[-1] == (last + 1, False, "rollback to v2")
    check_offline(browser, server)


def test_jobs_page(browser: WebDriver, server: Server) -> None:
    open_page(browser, server, "/")
    browser.find_element(By.LINK_TEXT, "Jobs").click()
    wait(browser).until(ec.presence_of_element_located((By.ID, "no-jobs")))
    check_offline(browser, server)
    screenshot(browser, "jobs")


@pytest.mark.postgres
def test_on_postgresql(
    browser: WebDriver,
    tmp_path: Path,
    fresh_postgres_url: str,
    review_studies: Callable[..., None],
) -> None:
    review_studies(fresh_postgres_url, replay_trials=6, graph_trials=9)
    server = Server(fresh_postgres_url, tmp_path / "serve.log")
    try:
        storage = server.storage()
        try:
            best = load_study("aime", storage).best_trial
            versions = len(storage.get_graph_versions("graphs"))
        finally:
            storage.close()
        open_page(browser, server, "/studies/aime")
        assert browser.find_element(By.ID, "trial-count").text == "6"
        assert browser.find_element(By.ID, "best-plan-link").text == best.plan.summary()
        plots_drawn(browser, 2)
        check_offline(browser, server)
        screenshot(browser, "study-postgres")
        open_page(browser, server, "/graphs/graphs")
        assert browser.find_element(By.ID, "version-title").text == f"version {versions} of {versions}"
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "pin-button").click()
        wait(browser).until(ec.presence_of_element_located((By.ID, "pinned-badge")))
        storage = server.storage()
        try:
            assert storage.latest_graph_version("graphs").pinned
        finally:
            storage.close()
        check_offline(browser, server)
    finally:
        server.close()
