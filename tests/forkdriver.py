"""Run ``catalog`` CLI jobs in separate processes, cheaply: import torch and the catalog once,
then fork one child per job, each calling ``catalog.cli.main(argv)`` as ``python3 -m catalog``
would.  A child is a real process with its own database connections, killed with a real
``SIGKILL``; the import (~8 s on a busy CI core) is paid once instead of once per process.
Used by ``catalogcheck.run_driver`` (tests/test_crash.py, tests/test_concurrency.py).

stdin: ``{"steps": [[job, ...], ...]}``.  The jobs of one step run at the same time; steps run
one after the other.  A job::

    {"argvs": [[...], ...],        # catalog.cli.main argv lists, run in order in one process
     "env": {"NAME": "value"},     # set in the child (e.g. RETAILKLIP_CRASH_AT)
     "delay": 0.0,                 # start this many seconds after the step starts
     "start_when": "PATH",         # ... and not before PATH exists (or every running job ended)
     "touch_when_done": "PATH",    # create PATH when the process has ended
     "kill_after": 1.5,            # SIGKILL the child this many seconds after it started
     "timeout": 300}               # SIGKILL it after this long whatever happens (counted as hung)

or ``{"copytree": [SRC, DST]}``: copy a catalog directory (done before the step's processes
start, so it preserves the state the previous step left, e.g. right after a crash).

stdout, last line: ``{"steps": [[result, ...], ...]}`` with, per job: ``rcs`` (exit code of each
argv that finished), ``stdout`` and ``stderr`` (one string per argv), ``signal`` (the signal that ended the process, else null), ``killed``
(the driver sent the SIGKILL), ``hung``, ``started_when_ready`` (start_when was satisfied),
``seconds``, ``stdout``, ``stderr``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # many children share 2 cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path


def _child(job: dict, work: Path) -> None:
    os.environ.update(job.get("env") or {})
    from catalog.cli import main

    for i, argv in enumerate(job["argvs"]):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, name in ((1, "stdout"), (2, "stderr")):
            f = os.open(work / f"{name}.{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(f, fd)
            os.close(f)
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - an uncaught exception is a finding; keep going
            traceback.print_exc()
            rc = 99
        sys.stdout.flush()
        sys.stderr.flush()
        with open(work / "rcs", "a") as f:
            f.write(f"{rc}\n")
    os._exit(0)


def _read(path: Path) -> str:
    return path.read_text(errors="backslashreplace") if path.exists() else ""


def _run_step(jobs: list[dict], tmp: Path) -> list[dict]:
    for job in jobs:  # copies first (of directories no child is using: taken between steps)
        if "copytree" in job:
            shutil.copytree(*job["copytree"])
    t0 = time.monotonic()
    state = [{"pid": None, "start": None, "end": None, "status": None, "killed": False, "hung": False, "ready": True} for _ in jobs]
    works = []
    for n in range(len(jobs)):
        w = Path(tempfile.mkdtemp(prefix=f"job{n}-", dir=tmp))
        works.append(w)
    while True:
        now = time.monotonic()
        for n, (job, s) in enumerate(zip(jobs, state)):
            if s["pid"] is not None:
                continue
            if "copytree" in job:
                s["pid"], s["start"], s["end"], s["status"] = -1, now, now, 0
                continue
            if now - t0 < float(job.get("delay") or 0):
                continue
            cond = job.get("start_when")
            if cond and not os.path.exists(cond):
                running = any(st["pid"] is not None and st["end"] is None for st in state)
                if running or any(st["pid"] is None and st is not s and not jobs[i].get("start_when") for i, st in enumerate(state)):
                    continue
                s["ready"] = False  # nothing left that could satisfy it: start anyway, report it
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    _child(job, works[n])
                finally:
                    os._exit(98)
            s["pid"], s["start"] = pid, time.monotonic()
        for job, s in zip(jobs, state):
            if s["pid"] is None or s["end"] is not None:
                continue
            pid, status = os.waitpid(s["pid"], os.WNOHANG)
            if pid:
                s["end"], s["status"] = time.monotonic(), status
                if job.get("touch_when_done"):
                    Path(job["touch_when_done"]).touch()
                continue
            age = time.monotonic() - s["start"]
            if job.get("kill_after") is not None and age >= float(job["kill_after"]) and not s["killed"]:
                os.kill(s["pid"], signal.SIGKILL)
                s["killed"] = True
            elif age >= float(job.get("timeout") or 300) and not s["hung"]:
                os.kill(s["pid"], signal.SIGKILL)
                s["hung"] = True
        if all(s["end"] is not None for s in state):
            break
        time.sleep(0.005)
    results = []
    for job, s, w in zip(jobs, state, works):
        if "copytree" in job:
            results.append({"copied": True})
            continue
        rcs_file = w / "rcs"
        rcs = [int(x) for x in rcs_file.read_text().split()] if rcs_file.exists() else []
        st = s["status"]
        n = len(job["argvs"])
        results.append({
            "rcs": rcs,
            "signal": os.WTERMSIG(st) if os.WIFSIGNALED(st) else None,
            "killed": s["killed"],
            "hung": s["hung"],
            "started_when_ready": s["ready"],
            "seconds": round(s["end"] - s["start"], 3),
            "stdout": [_read(w / f"stdout.{i}") for i in range(n)],
            "stderr": [_read(w / f"stderr.{i}") for i in range(n)],
        })
    return results


def _warm_up() -> None:
    """Build and run the tests' tiny encoder once, so that torch's and open_clip's one-time
    initialisation (~0.5 s) is inherited by every child instead of repeated in each.  Safe to
    fork after: with OMP_NUM_THREADS=1 torch starts no worker threads."""
    from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC
    from PIL import Image

    from retailklip.encoders import create_encoder

    create_encoder(TINY_CLIP_SPEC, random_init=True, **TINY_CLIP_OPTIONS).embed([Image.new("RGB", (16, 16))])


def main() -> None:
    spec = json.loads(sys.stdin.read())
    # Import everything the children need once, before forking (no torch op runs here, so no
    # thread pool exists yet that a fork could break).
    import open_clip  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401

    import catalog.cli
    import catalog.store  # noqa: F401

    if spec.get("warmup", True):
        _warm_up()

    out = []
    with tempfile.TemporaryDirectory(prefix="forkdriver-") as tmp:
        for step in spec["steps"]:
            out.append(_run_step(step, Path(tmp)))
    print(json.dumps({"steps": out}))


if __name__ == "__main__":
    main()
