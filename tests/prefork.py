"""Run `python ...` command lines as processes forked from one that has already imported the heavy modules.

Every command line of the suite starts Python and imports torch, torchvision (which imports torch._dynamo)
and, for QAT, Model Optimizer: about 5 s on 2 cores before any work, more than most toy-sized lines take
to run. A server imports them once; each command line is then a process forked from it. The process is a
command of its own, as a user's is: its own session, environment, working directory, standard streams (and
every other open file of whoever asked), exit status (SystemExit, an exception's 1, a signal's death), signals
and exit handlers. Only the imports are shared, and the server runs nothing else, so no state of a previous line
can leak into the next.

    result = prefork.run([sys.executable, "main.py", ...], cwd=ROOT, env=env, timeout=180)   # a shared server
    python = prefork.python()   # an executable that runs `python ARGS` the same way

The forked processes' own `sys.executable` is that executable too, so the Python processes a command line starts
(torchrun's workers, the steps of bench/run_gpu.sh or bench/toolkit_table.py) are forked from the server as well;
`PYTHON=$(prefork.python()) bash scripts/demo.sh` reaches scripts that honour $PYTHON. The executable is a small
client (python -S, no torch): it passes its arguments, environment, working directory and open files to the
server over a Unix socket, forwards the signals it receives (TERM, INT, HUP, QUIT, USR1, USR2) to its command,
and exits as the command did; a command it loses (the client killed) is killed with its process group. What the
fork cannot reproduce -- an interpreter flag other than -u/-B/-q, an interactive interpreter, more open files
than one message carries, a server that has gone -- runs in an interpreter of its own instead.

A command line that does not start with this interpreter runs as a plain subprocess.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# Imported by the server before it forks (what every command line of the suite imports anyway).
PRELOAD = ("torch", "torchvision", "image_classification.train", "image_classification.data.pytorch_backend",
           "image_classification.launcher", "image_classification.deploy.classify", "image_classification.deploy.export",
           "image_classification.toolkit.quantization", "modelopt.torch.quantization", "onnxruntime", "numpy", "PIL.Image")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
MAX_FDS = 250  # open files passed in one message (the kernel's limit is 253)
IGNORED_FLAGS = ("-u", "-B", "-q")  # interpreter flags a forked command may pass over (its streams are line-buffered)


# --- the protocol: one connection per command -----------------------------------------------------------------
# client -> server: 8 bytes (the request's length) with the open files attached, then the request as JSON
# ({"argv", "cwd", "env", "fds": the client's numbers of the attached files}); later {"signal": N} lines.
# server -> client: {"pid": N} once the command runs, then {"status": exit status or -signal} when it ends.

def _send_request(sock: socket.socket, argv: list[str], cwd: str, env: dict[str, str], fds: list[int],
                  numbers: list[int] | None = None) -> None:
    """Attach the open files `fds`, to be the command's `numbers` (the same numbers by default)."""
    payload = json.dumps({"argv": argv, "cwd": cwd, "env": env, "fds": fds if numbers is None else numbers}).encode()
    socket.send_fds(sock, [len(payload).to_bytes(8, "little")], fds)
    sock.sendall(payload)


def _receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, 8, MAX_FDS)
    size, payload = int.from_bytes(head, "little"), b""
    while len(payload) < size:
        chunk = conn.recv(size - len(payload))
        if not chunk:
            raise EOFError("prefork: request cut short")
        payload += chunk
    return json.loads(payload), fds


def _message(sock: socket.socket, **fields) -> None:
    sock.sendall((json.dumps(fields) + "\n").encode())


class _Lines:
    """The JSON lines of a connection, one at a time (None at its end), with a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def next(self, timeout: float | None = None) -> dict | None:
        while b"\n" not in self.buffer:
            if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
                raise TimeoutError
            chunk = self.sock.recv(4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


# --- the test session's side ----------------------------------------------------------------------------------

class PreforkServer:
    """A server process with PRELOAD imported; `run()` forks a command of it per command line, and `python` is the
    executable that does the same for whoever runs it."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="prefork-"))
        self.socket, self.python = self.folder / "socket", str(self.folder / "python")
        # The server's torch takes a fresh interpreter's thread count (no OMP_NUM_THREADS); a command gets its own.
        env = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}
        self.process = subprocess.Popen([sys.executable, __file__, str(self.socket), self.python, *preload], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"prefork server did not start: {ready!r}")

    def run(self, argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        """Run argv to its end (or kill its process group after `timeout` s, raising TimeoutExpired)."""
        if argv[0] not in (sys.executable, self.python):
            return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                                  start_new_session=True)
        with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "rb") as stdin, \
                open(Path(tmp) / "stdout", "w+b") as stdout, open(Path(tmp) / "stderr", "w+b") as stderr, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self.socket))
            _send_request(sock, argv[1:], str(cwd), env, [stdin.fileno(), stdout.fileno(), stderr.fileno()], [0, 1, 2])
            lines = _Lines(sock)
            started = lines.next()
            if started is None:
                raise RuntimeError(f"the prefork server did not start {argv}")
            pid = started["pid"]
            try:
                status, timed_out = lines.next(timeout)["status"], False
            except TimeoutError:
                try:
                    os.killpg(pid, signal.SIGKILL)  # the command's session: its workers, its own commands' clients
                except ProcessLookupError:  # it ended just now
                    pass
                status, timed_out = lines.next()["status"], True
            result = subprocess.CompletedProcess(argv, status, _read(stdout), _read(stderr))
        if timed_out:
            raise subprocess.TimeoutExpired(argv, timeout, result.stdout, result.stderr)
        return result

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PreforkServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


_SHARED: PreforkServer | None = None


def _shared() -> PreforkServer:
    """One server for the whole test session (started on first use, closed at exit)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = PreforkServer()
        atexit.register(_SHARED.close)
    return _SHARED


def run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess:
    """PreforkServer.run on the session's shared server."""
    return _shared().run(argv, cwd=cwd, env=dict(os.environ) if env is None else env, timeout=timeout)


def python() -> str:
    """The session's shared server's `python` executable."""
    return _shared().python


# --- the client: the `python` executable ----------------------------------------------------------------------

def client(server_socket: str, interpreter: str) -> int:
    """Run `python ARGS` (this process's arguments) as a command forked from the server; exit as it did."""
    argv = sys.argv[1:]
    fds = _open_fds()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(fds) > MAX_FDS:
            raise OSError("too many open files to pass")
        sock.connect(server_socket)
        _send_request(sock, argv, os.getcwd(), dict(os.environ), fds)
    except OSError:  # no server (any more): an interpreter of its own
        os.execv(interpreter, [interpreter, *argv])
    lines = _Lines(sock)
    if lines.next() is None:  # the server could not start it: an interpreter of its own
        os.execv(interpreter, [interpreter, *argv])

    def forward(signum: int, frame) -> None:
        _message(sock, signal=signum)
    for signum in FORWARDED:
        signal.signal(signum, forward)
    ended = lines.next()
    if ended is None:
        print("prefork: the server went away", file=sys.stderr)
        return 1
    status = ended["status"]
    if status < 0:  # the command died of a signal: so does its stand-in
        _die_of(-status)
        return 128 - status
    return status


def _die_of(signum: int) -> None:
    """End this process by the signal `signum`, as a process without a handler for it ends."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _open_fds() -> list[int]:
    """This process's open file descriptors (the listing's own descriptor is closed by the time it is checked)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.append(int(name))
    return sorted(fds)


# --- the server side ------------------------------------------------------------------------------------------

def _serve(server_socket: str, executable: str, preload: list[str]) -> None:
    import importlib
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional dependency: the command lines that need it import it themselves
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(server_socket)
    listener.listen(64)
    tests = str(Path(__file__).parent)
    Path(executable).write_text(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {tests!r})\nfrom prefork import "
                                f"client\nsys.exit(client({server_socket!r}, {sys.executable!r}))\n")
    os.chmod(executable, 0o755)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 1.0)
        while True:  # reap the supervisors that have ended
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if sys.stdin in ready and not sys.stdin.readline():
            break  # the test session closed the pipe: it has ended (or was killed)
        if listener in ready:
            conn, _ = listener.accept()
            if os.fork() == 0:
                listener.close()
                os._exit(_supervise(conn, executable))
            conn.close()
    shutil.rmtree(Path(server_socket).parent, ignore_errors=True)  # the socket and the client


def _supervise(conn: socket.socket, executable: str) -> int:
    """One command: fork it, pass on the signals the client forwards, report its exit status; a client that
    disconnects before the command ends (killed) takes the command's process group with it."""
    request, fds = _receive_request(conn)
    pid = os.fork()
    if pid == 0:
        conn.close()
        os._exit(_command(request, fds, executable))
    for fd in fds:
        os.close(fd)
    _message(conn, pid=pid)
    try:
        ended = [os.pidfd_open(pid)]  # readable once the command has ended
    except (AttributeError, OSError):  # no pidfd (Linux before 5.3): look again every 0.1 s
        ended = []
    lines = _Lines(conn)
    while True:
        ready, _, _ = select.select([conn, *ended], [], [], None if ended else 0.1)
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            _message(conn, status=os.waitstatus_to_exitcode(wait_status))
            return 0
        if conn not in ready:
            continue
        message = lines.next()
        if message is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return 0
        try:
            os.kill(pid, message["signal"])
        except ProcessLookupError:
            pass


def _command(request: dict, fds: list[int], executable: str) -> int:
    """Become the command line's process: session, open files, environment, cwd, argv; run it; its exit status."""
    os.setsid()
    numbers = request["fds"]
    above = max([*numbers, 2]) + 1  # each file moves above every number it may take, then takes its number
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, above) for fd in fds]
    for fd in fds:
        os.close(fd)
    for fd, number in zip(moved, numbers):
        os.dup2(fd, number)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    argv = list(request["argv"])
    while argv and argv[0] in IGNORED_FLAGS:
        argv.pop(0)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-c", "-m")):
        os.execv(sys.executable, [sys.executable, *request["argv"]])  # what a fork cannot be: a real interpreter
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:  # a fresh torch reads it at import
        sys.modules["torch"].set_num_threads(int(threads))
    sys.executable = executable  # the Python processes this command starts are forked as well
    sys.path[1:1] = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    import runpy
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
    except BaseException as error:  # noqa: BLE001 - reported as Python reports an uncaught exception
        traceback.print_exc()
        status = -signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1  # Python dies of an uncaught ^C
    atexit._run_exitfuncs()  # what interpreter exit would run (multiprocessing's, the loaders' close)
    sys.stdout.flush()
    sys.stderr.flush()
    if status < 0:
        _die_of(-status)
    return status


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the project, not tests/; each command sets its own
    _serve(sys.argv[1], sys.argv[2], sys.argv[3:])
