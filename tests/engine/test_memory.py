"""The dismax process keeps freed memory (glibc's malloc thresholds fixed): a step that frees and allocates the
same buffers again is not page-faulted back, and the user's own choice wins."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from dismax_plugin.adapters.engine import _memory

glibc = pytest.mark.skipif(not _memory.on_glibc(), reason="glibc's malloc only")

# Four 1 MiB tensors (1024 pages) written and freed in a cycle. After a warm-up, prints the minor page faults
# per cycle of the quietest of five windows: a few faults that are not the allocator's (the kernel's own page
# work, the heap layout settling after a command) do not decide the test, a cycle whose buffers went back to the
# system faults about all of its pages in again.
_BUFFER_FLOATS = 1 << 18  # 1 MiB of float32
_PAGES = 4 * _BUFFER_FLOATS * 4 // resource.getpagesize()
_KEPT_BELOW, _GIVEN_BACK_ABOVE = _PAGES / 16, _PAGES / 2  # faults per cycle
_CYCLES = """
import resource, torch
{setup}
def cycle():
    buffers = [torch.empty({floats}).fill_(1.0) for _ in range(4)]
    del buffers
for _ in range(10):
    cycle()
windows = []
for _ in range(5):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        cycle()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 20)
print(min(windows))
"""
_KEEP = "from dismax_plugin.adapters.engine._memory import keep_freed_memory\nprint(keep_freed_memory())"
# glibc told to give every freed block back at once: what its moving default thresholds do in some states
_GIVE_BACK = {"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "131072"}


def _run(setup: str, **env: str) -> list[str]:
    environment = {k: v for k, v in os.environ.items() if k not in _memory._USER_CHOICES}
    environment.update(env)
    script = _CYCLES.format(setup=setup, floats=_BUFFER_FLOATS)
    return subprocess.run([sys.executable, "-c", script], env=environment, check=True, capture_output=True,
                          text=True).stdout.split()  # fmt: skip


@glibc
def test_fixed_thresholds_stop_the_page_faults_of_a_repeated_step():
    applied, faults = _run(_KEEP, **_GIVE_BACK)[-2:]  # the user's thresholds win: nothing is changed
    assert applied == "False" and float(faults) > _GIVEN_BACK_ABOVE  # the 4 MiB go back and fault in again
    applied, faults = _run(_KEEP)[-2:]
    assert applied == "True" and float(faults) < _KEPT_BELOW
    applied, faults = _run(_KEEP, DISMAX_SYSTEM_MALLOC="1")[-2:]
    assert applied == "False"


@glibc
def test_the_dismax_command_fixes_them_before_it_runs():
    # a command that stops at once (bad option combination, exit 2) has already fixed the thresholds: it
    # overrides a process that started out giving every freed block back
    run = (f"import ctypes\nlibc = ctypes.CDLL('libc.so.6')\nlibc.mallopt({_memory._M_TRIM_THRESHOLD}, 0)\n"
           f"libc.mallopt({_memory._M_MMAP_THRESHOLD}, 131072)\n"
           "from dismax_plugin.adapters.engine.cli import main\n"
           "assert main(['train', '--alias', 'best', '--no-track']) == 2")  # fmt: skip
    assert float(_run(run)[-1]) < _KEPT_BELOW
    assert float(_run(run.split("from dismax")[0])[-1]) > _GIVEN_BACK_ABOVE  # without the command: faults


@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "DISMAX_SYSTEM_MALLOC"])
def test_the_users_choice_in_the_environment_is_left_alone(name, monkeypatch):
    monkeypatch.setenv(name, "1")
    assert _memory.keep_freed_memory() is False


@glibc
def test_applied_on_glibc_without_a_choice(monkeypatch):
    for name in _memory._USER_CHOICES:
        monkeypatch.delenv(name, raising=False)
    assert _memory.keep_freed_memory() is True
