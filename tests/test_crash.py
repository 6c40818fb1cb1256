"""Crash safety of `catalog add`, `catalog import` and `catalog remove`: the process is killed with
SIGKILL at named points of the write path (``RETAILKLIP_CRASH_AT``, see catalog/faults.py)
and at random moments; after each kill the catalog must open, pass ``PRAGMA integrity_check``,
hold every reference's stored image and K vectors, show the command as all-or-nothing, still
recognise every SKU, and the re-run command must bring it to the expected state.

The children are forked by tests/forkdriver.py (one torch import for all of them); one test runs
a real ``python3 -m catalog`` process end to end.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys

import pytest
from catalogcheck import REPO, TESTS, check_consistent, run_driver
from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC

#: Crash points of the write path (catalog/store.py), in the order a write reaches them.
ADD_POINTS = ["add.after_tmp_file", "add.after_each_file", "add.after_file", "add.before_commit", "add.after_commit"]
IMPORT_POINTS = ["import.row@2", "add.after_tmp_file@2", "add.after_each_file@2", "add.after_file",
                 "add.before_commit", "add.after_commit"]
REMOVE_POINTS = ["remove.before_commit", "remove.after_commit"]
DETERMINISTIC = ([("add", p) for p in ADD_POINTS] + [("import", p) for p in IMPORT_POINTS]
                 + [("remove", p) for p in REMOVE_POINTS])
#: Kills at random moments (seeded; RETAILKLIP_CRASH_SEED picks another sequence).
RANDOM_KILLS = 6
SEED = int(os.environ.get("RETAILKLIP_CRASH_SEED", "20240607"))
SCENARIOS = [f"{op}:{point}" for op, point in DETERMINISTIC] + [f"random-{i}" for i in range(RANDOM_KILLS)]
#: Processes forked at once (memory: ~0.3 GB each).
BATCH = 7


@pytest.fixture(scope="module")
def sources(iconic):
    """SKU id -> source image: 3 in the base catalog, 1 for add, 3 for import."""
    return {
        "base0": iconic[0][2], "base1": iconic[20][2], "base2": iconic[40][2],
        "new": iconic[60][2],
        "imp0": iconic[10][2], "imp1": iconic[30][2], "imp2": iconic[50][2],
    }


@pytest.fixture(scope="module")
def base_catalog(tmp_path_factory, sources):
    from catalog import Catalog

    root = tmp_path_factory.mktemp("crash") / "base"
    cat = Catalog.init(root, encoder=TINY_CLIP_SPEC, augmentations=2, random_init=True, encoder_options=TINY_CLIP_OPTIONS)
    for sku in ("base0", "base1", "base2"):
        cat.add(sources[sku], sku=sku)
    cat.close()
    return root


def _command(op: str, d: str, csv_path: str) -> list[str]:
    if op == "add":
        return ["--catalog", d, "add", "{new}", "--sku", "new", "--name", "New"]
    if op == "import":
        return ["--catalog", d, "import", csv_path]
    return ["--catalog", d, "remove", "base0"]


def _expected(op: str) -> tuple[set, set]:
    before = {"base0", "base1", "base2"}
    after = {"add": before | {"new"}, "import": before | {"imp0", "imp1", "imp2"}, "remove": before - {"base0"}}[op]
    return before, after


@pytest.fixture(scope="module")
def crash_run(base_catalog, sources, tmp_path_factory):
    """Run every scenario once: crash step, then (per scenario) a copy of the crashed directory,
    `catalog check` and recognition on the crashed state, the re-run command, recognition and
    `catalog check` again."""
    import shutil

    work = tmp_path_factory.mktemp("crashrun")
    csv_path = work / "new.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "sku", "name"])
        for sku in ("imp0", "imp1", "imp2"):
            w.writerow([os.path.relpath(sources[sku], work), sku, f"Imported {sku}"])
    rng = random.Random(SEED)
    plan = {}
    for name in SCENARIOS:
        d = work / name.replace(":", "_").replace("@", "_")
        shutil.copytree(base_catalog, d)
        if name.startswith("random-"):
            op = ("add", "import")[int(name.split("-")[1]) % 2]
            job = {"kill_after": round(rng.uniform(0.05, 2.5), 3), "env": {}}
        else:
            op, point = name.split(":", 1)
            job = {"env": {"RETAILKLIP_CRASH_AT": point}}
        argv = [a.replace("{new}", str(sources["new"])) for a in _command(op, str(d), str(csv_path))]
        plan[name] = {"op": op, "dir": d, "crashed": work / (d.name + ".crashed"), "argv": argv, "job": dict(job, argvs=[argv])}
    recognize_all = [str(p) for p in sources.values()]
    names = list(plan)
    steps = []
    for b in range(0, len(names), BATCH):
        steps.append([plan[n]["job"] for n in names[b : b + BATCH]])
    for b in range(0, len(names), BATCH):
        step = [{"copytree": [str(plan[n]["dir"]), str(plan[n]["crashed"])]} for n in names[b : b + BATCH]]
        for n in names[b : b + BATCH]:
            rec = ["--catalog", str(plan[n]["dir"]), "recognize", *recognize_all, "--json", "--threshold", "2"]
            chk = ["--catalog", str(plan[n]["dir"]), "check", "--json"]
            step.append({"argvs": [chk, rec, plan[n]["argv"], rec, chk]})
        steps.append(step)
    results = run_driver(steps)
    crash_results = [r for step in results[: len(steps) // 2] for r in step]
    after_results = [r for step in results[len(steps) // 2 :] for r in step if "copied" not in r]
    for n, c, a in zip(names, crash_results, after_results):
        plan[n]["crash"], plan[n]["after"] = c, a
    return plan


def _recognized(stdout: str, sources) -> dict[str, str]:
    by_path = {str(p): sku for sku, p in sources.items()}
    return {by_path[o["image"]]: o["recognitions"][0]["nearest_sku"] for o in json.loads(stdout)}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crash_leaves_catalog_consistent_and_rerun_completes(crash_run, sources, scenario):
    p = crash_run[scenario]
    crash, after = p["crash"], p["after"]
    before_set, after_set = _expected(p["op"])
    if not scenario.startswith("random-"):
        point = scenario.split(":", 1)[1]
        assert crash["signal"] == signal.SIGKILL and not crash["killed"], (
            f"crash point {point!r} was not reached: add `crash_point({point.split('@')[0]!r})` to catalog/store.py "
            f"(rcs={crash['rcs']}, stderr={crash['stderr']})"
        )
    else:
        assert crash["signal"] == signal.SIGKILL or crash["rcs"] == [0], crash
    assert not crash["hung"] and not after["hung"]
    # 1. The crashed state: consistent, and the command happened entirely or not at all.
    state = check_consistent(p["crashed"])
    skus = set(state["skus"])
    assert skus in (before_set, after_set), f"half-done {p['op']}: {sorted(skus)}"
    # 2. `catalog check` finds no drift (a leftover image file of the killed add is younger than
    #    its grace period, so not yet an orphan), and recognition works on the crashed state:
    #    every SKU's own image is recognised as itself.
    assert after["rcs"][0] == 0 and json.loads(after["stdout"][0])["ok"], after["stdout"][0] + after["stderr"][0]
    assert after["rcs"][1] == 0, after["stderr"][1]
    got = _recognized(after["stdout"][1], sources)
    assert {s: got[s] for s in skus} == {s: s for s in skus}
    # 3. Re-running the command completes it (or says, in one line, that it was already done).
    if skus == before_set:
        assert after["rcs"][2] == 0, after["stderr"][2]
    else:
        err = after["stderr"][2].strip()
        assert after["rcs"][2] == 1 and err.count("\n") == 0, err
        assert err.startswith("catalog: error: ") and ("already" in err or "unknown SKU" in err), err
    final = check_consistent(p["dir"])
    assert set(final["skus"]) == after_set
    assert after["rcs"][3] == 0, after["stderr"][3]
    got = _recognized(after["stdout"][3], sources)
    assert {s: got[s] for s in after_set} == {s: s for s in after_set}
    assert after["rcs"][4] == 0 and json.loads(after["stdout"][4])["ok"], after["stdout"][4]
    # Nothing but unreferenced leftovers of the crash may remain beside the referenced files.
    assert final["references"] == len(after_set)


def test_crash_of_real_cli_process(base_catalog, sources, tmp_path):
    """A real `python3 -m catalog add` killed between writing the image and committing."""
    import shutil

    d = tmp_path / "cat"
    shutil.copytree(base_catalog, d)
    env = dict(os.environ, RETAILKLIP_CRASH_AT="add.before_commit",
               PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "catalog", "--catalog", str(d), "add", str(sources["new"]), "--sku", "new"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert r.returncode == -signal.SIGKILL, f"not killed at add.before_commit (rc {r.returncode}): {r.stderr[-500:]}"
    state = check_consistent(d)
    assert set(state["skus"]) == {"base0", "base1", "base2"}
    from catalog.cli import main

    assert main(["--catalog", str(d), "add", str(sources["new"]), "--sku", "new"]) == 0
    state = check_consistent(d)
    assert set(state["skus"]) == {"base0", "base1", "base2", "new"} and not state["orphans"]
