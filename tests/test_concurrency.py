"""Concurrency: several `catalog add` processes on one SQLite catalog, writer races inside the
write path (made deterministic with RETAILKLIP_PAUSE_AT, see catalog/faults.py), and
recognizer threads reading while another thread adds and removes SKUs."""

from __future__ import annotations

import threading

import pytest
from catalogcheck import check_consistent, run_driver
from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC, TINY_CLIP_OPTIONS, TINY_CLIP_SPEC

#: Longest pause of a writer held inside its critical section (seconds of wall time, no CPU).
PAUSE_S = 8


def _init(root, sources=()):
    from catalog import Catalog

    cat = Catalog.init(root, encoder=TINY_CLIP_SPEC, augmentations=2, random_init=True, encoder_options=TINY_CLIP_OPTIONS)
    for sku, path in sources:
        cat.add(path, sku=sku)
    cat.close()
    return root


def _add(d, image, sku):
    return ["--catalog", str(d), "add", str(image), "--sku", sku]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, iconic):
    """All multi-process scenarios in one driver run (one torch import).

    Step 1, all at once: A) 2 processes adding different SKUs; B) 2 adding the same id from
    different images; C) 2 adding the same id from the same image; D) 4 processes adding 3 SKUs
    each.  Step 2, deterministic races: E) writer 1 has stored the image file and pauses before
    its transaction while writer 2 adds the same image under the same id; F) the same under
    another id; G) `remove` has committed and pauses before deleting the image file while
    another process adds that image as a new SKU.
    """
    work = tmp_path_factory.mktemp("conc")
    img = [p for _, _, p in iconic]
    d = {k: _init(work / k) for k in "ABCDEF"}
    d["G"] = _init(work / "G", [("old", img[5])])
    go = {k: str(work / f"go-{k}") for k in "EFG"}
    step1 = [
        {"argvs": [_add(d["A"], img[0], "a0")]},
        {"argvs": [_add(d["A"], img[1], "a1")]},
        {"argvs": [_add(d["B"], img[2], "same")]},
        {"argvs": [_add(d["B"], img[3], "same")]},
        {"argvs": [_add(d["C"], img[4], "same")]},
        {"argvs": [_add(d["C"], img[4], "same")]},
    ] + [{"argvs": [_add(d["D"], img[10 + 3 * p + i], f"p{p}-{i}") for i in range(3)]} for p in range(4)]

    def paused(k, argv, point):
        # The pause ends when the other writer is done, or after PAUSE_S if that writer is
        # (correctly) blocked by a lock the paused one holds.
        env = {"RETAILKLIP_PAUSE_AT": point, "RETAILKLIP_PAUSE_FILE": go[k], "RETAILKLIP_PAUSE_LIMIT": str(PAUSE_S)}
        return {"argvs": [argv], "env": env}

    def second(k, argv):
        return {"argvs": [argv], "start_when": go[k] + ".reached", "touch_when_done": go[k]}

    step2 = [
        paused("E", _add(d["E"], img[6], "same"), "add.after_file"), second("E", _add(d["E"], img[6], "same")),
        paused("F", _add(d["F"], img[7], "first"), "add.after_file"), second("F", _add(d["F"], img[7], "second")),
        paused("G", ["--catalog", str(d["G"]), "remove", "old"], "remove.after_commit"),
        second("G", _add(d["G"], img[5], "new")),
    ]
    s1, s2 = run_driver([step1, step2])
    return d, s1, s2


def _one_line_error(err: str, pattern: str) -> None:
    err = err.strip()
    assert err.startswith("catalog: error: ") and "\n" not in err and pattern in err, err


def test_two_processes_add_different_skus(runs):
    d, s1, _ = runs
    assert [r["rcs"] for r in s1[0:2]] == [[0], [0]], [r["stderr"] for r in s1[0:2]]
    assert check_consistent(d["A"])["skus"] == ["a0", "a1"]


@pytest.mark.parametrize("case,jobs", [("B", slice(2, 4)), ("C", slice(4, 6))], ids=["different-images", "same-image"])
def test_two_processes_add_the_same_sku(runs, case, jobs):
    d, s1, _ = runs
    res = s1[jobs]
    rcs = sorted(r["rcs"][0] for r in res)
    assert rcs == [0, 1], [r["stderr"] for r in res]
    loser = next(r for r in res if r["rcs"] == [1])
    _one_line_error(loser["stderr"][0], "already")
    state = check_consistent(d[case])
    assert state["skus"] == ["same"] and state["references"] == 1 and not state["orphans"]


def test_four_processes_add_three_skus_each(runs):
    d, s1, _ = runs
    assert [r["rcs"] for r in s1[6:10]] == [[0, 0, 0]] * 4, [r["stderr"] for r in s1[6:10]]
    state = check_consistent(d["D"])
    assert state["skus"] == sorted(f"p{p}-{i}" for p in range(4) for i in range(3))
    assert state["references"] == 12 and not state["orphans"]


@pytest.mark.parametrize("case,ids", [("E", ["same", "same"]), ("F", ["first", "second"])], ids=["same-id", "other-id"])
def test_failed_writer_does_not_delete_the_winners_image(runs, case, ids):
    """Writer 1 pauses inside its write after storing the image file and before committing;
    writer 2 adds the same image meanwhile.  Exactly one wins, the other gets a one-line
    duplicate error, and the loser must not delete the image file the winner's reference names
    (an item lost).  (Writer 2 may also be held off by a lock until writer 1 is done.)"""
    d, _, s2 = runs
    jobs = s2[{"E": slice(0, 2), "F": slice(2, 4)}[case]]
    assert jobs[1]["started_when_ready"], "pause point add.after_file not reached"
    assert sorted(j["rcs"][0] for j in jobs) == [0, 1], [j["stderr"] for j in jobs]
    winner = next(n for n, j in enumerate(jobs) if j["rcs"] == [0])
    _one_line_error(jobs[1 - winner]["stderr"][0], "already")
    state = check_consistent(d[case])  # raises "stored file ... missing (item lost)"
    assert state["skus"] == [ids[winner]] and not state["orphans"]


def test_remove_does_not_delete_an_image_added_meanwhile(runs):
    """`remove` committed and pauses before deleting its image file; meanwhile another process
    adds the same image as a new SKU (the file exists, so it writes none).  The remover must
    not then delete the file the new SKU's reference names."""
    d, _, s2 = runs
    remover, adder = s2[4], s2[5]
    assert adder["started_when_ready"], "pause point remove.after_commit not reached: add crash_point('remove.after_commit') to catalog/store.py"
    assert remover["rcs"] == [0] and adder["rcs"] == [0], (remover["stderr"], adder["stderr"])
    assert check_consistent(d["G"])["skus"] == ["new"]


def test_recognize_threads_while_writer_adds_and_removes(tmp_path, mobilenet_weights, iconic, val_photos):
    """Three threads recognise real GroceryStore photos while a fourth adds 12 SKUs and removes 6:
    no exception, every answer names an SKU that existed at some point, no SKU is lost, and
    afterwards every remaining SKU's own packshot is recognised as itself."""
    from catalog import Catalog
    from retailklip import Recognizer

    cat = Catalog.init(tmp_path / "cat", encoder=MOBILENET_SPEC, weights=mobilenet_weights, augmentations=1,
                       encoder_options=MOBILENET_OPTIONS)
    packshot = {f"sku{n:02d}": iconic[n * 4][2] for n in range(20)}
    initial = list(packshot)[:8]
    for s in initial:
        cat.add(packshot[s], sku=s)
    rec = Recognizer(cat)
    ever = set(initial)
    expected = set(initial)
    errors: list[BaseException] = []
    answers: list[tuple[str, str | None]] = []
    done = threading.Event()

    def writer():
        try:
            for n, s in enumerate(list(packshot)[8:]):
                ever.add(s)
                cat.add(packshot[s], sku=s)
                expected.add(s)
                if n % 2 == 1:
                    gone = min(expected)
                    expected.discard(gone)
                    cat.remove(gone)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()

    def reader(photos):
        try:
            passes = 0
            while not done.is_set() or passes < 1:
                for p in photos:
                    for r in rec.recognize(p):
                        known = set(ever)
                        answers.append((r.nearest_sku, r.runner_up.sku if r.runner_up else None))
                        assert r.nearest_sku in known, r
                        assert r.runner_up is None or r.runner_up.sku in known, r
                passes += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    photos = [p for p, _ in val_photos[::25]]
    threads = [threading.Thread(target=reader, args=(photos[i::3],)) for i in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    assert len(answers) >= len(photos)
    assert {i.sku for i in cat.list_skus()} == expected and len(expected) == 14
    for s in sorted(expected):
        r = rec.recognize(packshot[s])[0]
        assert r.sku == s and r.distance < 1e-3, (s, r)
    removed = ever - expected
    for p in photos[:4]:
        r = rec.recognize(p)[0]
        assert r.nearest_sku not in removed and (r.runner_up is None or r.runner_up.sku not in removed)
    check_consistent(cat.root)
