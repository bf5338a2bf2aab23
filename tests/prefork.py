"""Run `python ...` command lines as processes forked from one that has already imported the heavy modules.

Every command line of the suite starts Python and imports torch, torchvision (which imports torch._dynamo)
and, for QAT, Model Optimizer: about 5 s on 2 cores before any work, more than most toy-sized lines take
to run. `PreforkServer` imports them once; each command line is then a child forked from it. The child is a
process of its own, as a user's command is: its own process group, environment, working directory, standard
streams, exit status (SystemExit, an exception's 1), signals and exit handlers. Only the imports are shared,
and the server runs nothing else, so no state of a previous line can leak into the next.

    result = prefork.run([sys.executable, "main.py", ...], cwd=ROOT, env=env, timeout=180)   # a shared server

A command line that does not start with this interpreter runs as a plain subprocess.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Imported by the server before it forks (what every command line of the suite imports anyway).
PRELOAD = ("torch", "torchvision", "image_classification.train", "image_classification.data.pytorch_backend",
           "image_classification.launcher", "image_classification.deploy.classify", "image_classification.deploy.export",
           "image_classification.toolkit.quantization", "modelopt.torch.quantization", "onnxruntime", "numpy", "PIL.Image")


class PreforkServer:
    """A server process with PRELOAD imported; `run()` forks a child of it per command line."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        self.process = subprocess.Popen([sys.executable, __file__, *preload], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"prefork server did not start: {ready!r}")

    def run(self, argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        """Run argv to its end (or kill its process group after `timeout` s, raising TimeoutExpired)."""
        if argv[0] != sys.executable:
            return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                                  start_new_session=True)
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv": argv[1:], "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self.process.stdin.write(json.dumps(request) + "\n")
            pid = json.loads(self.process.stdout.readline())["pid"]
            ready, _, _ = select.select([self.process.stdout], [], [], timeout)
            if not ready:
                os.killpg(pid, signal.SIGKILL)
            status = json.loads(self.process.stdout.readline())["status"]
            result = subprocess.CompletedProcess(argv, status, out.read_text(errors="replace"),
                                                 err.read_text(errors="replace"))
        if not ready:
            raise subprocess.TimeoutExpired(argv, timeout, result.stdout, result.stderr)
        return result

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)

    def __enter__(self) -> "PreforkServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHARED: PreforkServer | None = None


def run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess:
    """PreforkServer.run on one server shared by the whole test session (started on first use, closed at exit)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = PreforkServer()
        atexit.register(_SHARED.close)
    return _SHARED.run(argv, cwd=cwd, env=dict(os.environ) if env is None else env, timeout=timeout)


# --- the server side ---------------------------------------------------------------------------------------

def _child(request: dict) -> int:
    """Become the command line's process: session, streams, environment, cwd, argv; run it; its exit status."""
    os.setsid()
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    import runpy
    argv = request["argv"]
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = str(Path(argv[0]).resolve().parent)  # as `python script.py` sets it
            runpy.run_path(argv[0], run_name="__main__")
        status = 0
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            status = code or 0
        else:  # SystemExit("message"), as Python itself reports it
            print(code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: BLE001 - reported as Python reports an uncaught exception
        import traceback
        traceback.print_exc()
        status = 1
    import atexit
    atexit._run_exitfuncs()  # what interpreter exit would run (multiprocessing's, the loaders' close)
    sys.stdout.flush()
    sys.stderr.flush()
    return status


def _serve(preload: list[str]) -> None:
    import importlib
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional dependency: the command lines that need it import it themselves
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(request))
        print(json.dumps({"pid": pid}), flush=True)
        _, wait_status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(wait_status)}), flush=True)


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the project, not tests/; each child sets its own
    _serve(sys.argv[1:])
