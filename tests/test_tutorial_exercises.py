"""The course's exercises: every solution passes its own check, and a check rejects what is not a solution.

Each chapter (tutorials/NN_*.py) ends with exercises; their checks live in tutorials/_exercises.py (registered by
number, "3.2") and their solutions in tutorials/solutions/NN_*.py, one function per exercise, named as the
chapter's stub. A check computes its expected answer with minilora's or PyTorch's code, so these tests compare a
hand-written solution with the library. Fast: tensors of a few hundred numbers.
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
sys.path.insert(0, str(TUTORIALS))
import _exercises  # noqa: E402  (tutorials/ is not a package; its helpers are imported as the chapters do)

CHAPTERS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
TRY_IT = re.compile(r"_exercises\.try_it\(_exercises\.EXERCISES\[\"(\d+\.\d+)\"\], (\w+)\)")


def _solution_module(chapter: Path):
    path = TUTORIALS / "solutions" / chapter.name
    spec = importlib.util.spec_from_file_location(f"solution_{chapter.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exercises_of(chapter: Path) -> list[tuple[str, str]]:
    """(number, function name) of each exercise the chapter asks, in its order."""
    return TRY_IT.findall(chapter.read_text(encoding="utf-8"))


CASES = [(chapter, number, name) for chapter in CHAPTERS for number, name in _exercises_of(chapter)]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_every_chapter_ends_with_two_to_four_exercises(chapter: Path):
    found = _exercises_of(chapter)
    assert 2 <= len(found) <= 4, f"{chapter.name}: {len(found)} exercises, expected 2-4"
    prefix = str(int(chapter.name[:2])) + "."
    assert all(number.startswith(prefix) for number, _ in found), f"{chapter.name}: numbers {found}"
    assert (TUTORIALS / "solutions" / chapter.name).is_file(), f"no solutions file for {chapter.name}"


def test_every_registered_check_is_asked_by_a_chapter():
    asked = {number for _, number, _ in CASES}
    assert asked == set(_exercises.EXERCISES), f"checks without a chapter: {set(_exercises.EXERCISES) - asked}"


@pytest.mark.parametrize("chapter,number,name", CASES, ids=[f"{n}-{f}" for _, n, f in CASES])
def test_solution_passes_its_check(chapter: Path, number: str, name: str):
    solution = getattr(_solution_module(chapter), name)
    _exercises.EXERCISES[number](solution)
    assert _exercises.try_it(_exercises.EXERCISES[number], solution)


@pytest.mark.parametrize("chapter,number,name", CASES, ids=[f"{n}-{f}" for _, n, f in CASES])
def test_check_rejects_a_stub_and_a_wrong_answer(chapter: Path, number: str, name: str, capsys):
    check = _exercises.EXERCISES[number]

    def stub(*args, **kwargs):
        raise NotImplementedError

    def wrong(*args, **kwargs):
        return None

    stub.__name__ = wrong.__name__ = name
    with pytest.raises(NotImplementedError):
        check(stub)
    with pytest.raises(AssertionError):
        check(wrong)
    assert not _exercises.try_it(check, stub) and "not attempted yet" in capsys.readouterr().out
    assert not _exercises.try_it(check, wrong) and "not yet:" in capsys.readouterr().out


@pytest.mark.parametrize("number,wrong", [
    ("3.2", lambda ids, n: [-100] * (n + 1) + list(ids[n + 1:])),   # off by one
    ("4.2", lambda d_in, d_out, r: (__import__("torch").zeros(r, d_in), __import__("torch").zeros(d_out, r))),
    ("6.2", lambda ids, mask: ids.masked_fill(ids == 2, -100)),      # masks by pad id = EOS: drops the real EOS
    ("7.2", lambda history: history[-1][0]),                         # the last step, not the best
    ("9.2", lambda q, A, B, s: __import__("torch").zeros(q.shape) + s * B @ A),  # ΔW alone: forgot the base
])
def test_checks_catch_the_classic_mistakes(number, wrong):
    """The mistakes the exercises are about: each check rejects them."""
    with pytest.raises(AssertionError):
        _exercises.EXERCISES[number](wrong)
