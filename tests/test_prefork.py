"""tests/prefork.py, which most command lines of the suite run through: a forked command behaves as a process of
its own (status, streams, open files, environment, signals, death), and so do the Python processes it starts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import prefork

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_status_streams_environment_and_threads_are_the_commands_own(tmp_path):
    code = ("import os, sys, torch; print(os.getcwd(), os.environ['PREFORK_TEST'], torch.get_num_threads()); "
            "print('to stderr', file=sys.stderr); sys.exit(3)")
    result = prefork.run([sys.executable, "-c", code], cwd=tmp_path, timeout=60,
                         env={**os.environ, "PREFORK_TEST": "x", "OMP_NUM_THREADS": "1"})
    assert (result.returncode, result.stdout, result.stderr) == (3, f"{tmp_path} x 1\n", "to stderr\n")
    died = prefork.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"],
                       cwd=tmp_path, timeout=60)
    assert died.returncode == -signal.SIGTERM


def test_the_python_a_command_starts_is_forked_too_and_keeps_stdin_and_passed_files(tmp_path):
    python = prefork.python()
    nested = ("import subprocess, sys; print(sys.executable); "
              "print(subprocess.run([sys.executable, '-c', 'import sys; print(sys.executable)'], capture_output=True, "
              "text=True).stdout, end='')")
    result = prefork.run([sys.executable, "-c", nested], cwd=tmp_path, timeout=60)
    assert result.stdout.splitlines() == [python, python], result.stderr
    echo = subprocess.run([python, "-c", "import sys; print(sys.stdin.read().upper())"], input="hello",
                          capture_output=True, text=True, timeout=60)
    assert echo.stdout == "HELLO\n"
    read, write = os.pipe()
    subprocess.run([python, "-c", f"import os; os.write({write}, b'through fd {write}')"], pass_fds=[write], timeout=60)
    os.close(write)
    assert os.read(read, 100) == f"through fd {write}".encode()
    os.close(read)
    # An interpreter flag a fork cannot honour gets an interpreter of its own.
    utf8 = subprocess.run([python, "-X", "utf8", "-c", "import sys; print(sys.flags.utf8_mode, sys.executable)"],
                          capture_output=True, text=True, timeout=120)
    assert utf8.stdout.split() == ["1", sys.executable]


def test_signals_reach_the_command_and_a_killed_client_takes_its_command_along(tmp_path):
    python = prefork.python()
    handler = ("import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(75))\n"
               "print('up', flush=True)\ntime.sleep(60)\n")
    process = subprocess.Popen([python, "-c", handler], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "up\n"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 75
    process.stdout.close()
    pid_file = tmp_path / "pid"
    process = subprocess.Popen([python, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                              "time.sleep(60)"])
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    process.kill()
    process.wait()
    command = int(pid_file.read_text())
    for _ in range(100):
        try:
            os.kill(command, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the command {command} outlived its killed client")


def test_a_command_past_its_timeout_is_killed(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired) as raised:
        prefork.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], cwd=tmp_path,
                    timeout=3)
    assert raised.value.stdout == "started\n"
