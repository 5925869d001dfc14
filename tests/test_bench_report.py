"""BENCHMARKS.md's writer: a ``--stages`` run rewrites only its stages' parts of the report."""

from __future__ import annotations

from pathlib import Path

from bench import report
from bench.__main__ import STAGES
from bench.config import Config
from bench.figures import Figure, Stage

ORDER = list(STAGES)


def _info(date: str, commit: str) -> dict[str, str]:
    return {
        "date": date,
        "nproc": "2",
        "cpu": "a cpu",
        "commit": commit,
        "load average at start": "1.00 1.00 1.00",
    }


def _stage(name: str, value: float, target: bool = True) -> Stage:
    st = Stage(name, f"The {name} stage", method=f"How {name} is measured.")
    st.figures.append(Figure(name, "speed", value, "ops/s", baseline=10.0, baseline_name="base"))
    if target:
        met = value >= 10
        st.figures.append(
            Figure(name, "goal", value, "ops/s", target=">= 10", met=met, why="" if met else "slow")
        )
    st.notes.append(f"a note of {name}")
    st.seconds = 3
    return st


def _section(text: str, name: str) -> str:
    """The section of stage ``name``: from its heading to the next ``## ``."""
    start = text.index(f"(`{name}`)\n")
    start = text.rindex("\n## ", 0, start) + 1
    end = text.find("\n## ", start)
    return text[start:end]


def _targets(text: str) -> list[str]:
    return [
        line for line in text[text.index("## Targets") :].splitlines() if line.startswith("| `")
    ]


def _full(path: Path) -> str:
    stages = [_stage("ring", 20), _stage("relay", 30), _stage("fanotify", 5, target=True)]
    return report.write(path, Config(repeats=5), _info("2026-01-01 10:00 UTC", "aaaaaaa"), stages)


def test_every_section_says_when_and_at_which_commit(tmp_path) -> None:
    text = _full(tmp_path / "B.md")
    for name in ("ring", "relay", "fanotify"):
        assert (
            "Measured 2026-01-01 10:00 UTC at commit aaaaaaa by `python -m bench`, "
            "5 runs per figure" in _section(text, name)
        )


def test_a_stages_run_rewrites_only_its_stages(tmp_path) -> None:
    path = tmp_path / "B.md"
    old = _full(path)
    new = report.write(
        path,
        Config(quick=True, repeats=2),
        _info("2026-02-02 12:00 UTC", "bbbbbbb"),
        [_stage("relay", 7)],
        only=["relay"],
        order=ORDER,
    )
    assert path.read_text() == new
    # the other stages' sections, the title part, method and machine: as they were
    for name in ("ring", "fanotify"):
        assert _section(new, name) == _section(old, name)
    assert (
        new[: new.index("\n## ", new.index("## Machine"))]
        == old[: old.index("\n## ", old.index("## Machine"))]
    )
    relay = _section(new, "relay")
    assert (
        "Measured 2026-02-02 12:00 UTC at commit bbbbbbb by "
        "`python -m bench --quick --stages relay`, 2 runs per figure" in relay
    )
    assert "| `relay.speed` | 7 ops/s |" in relay
    assert "30 ops/s" not in relay
    # stage order kept: ring, relay, fanotify
    assert new.index("(`ring`)") < new.index("(`relay`)") < new.index("(`fanotify`)")
    # Targets: the relay row replaced in place, the others' rows untouched
    old_rows, new_rows = _targets(old), _targets(new)
    assert [r.split(" |")[0] for r in new_rows] == [r.split(" |")[0] for r in old_rows]
    assert new_rows[0] == old_rows[0]
    assert new_rows[2] == old_rows[2]
    assert new_rows[1].startswith("| `relay.goal` | >= 10 | 7 ops/s |")
    assert "| **no** | slow |" in new_rows[1]
    assert new.endswith("\n")


def test_a_stage_new_to_the_report_is_added_in_stage_order(tmp_path) -> None:
    path = tmp_path / "B.md"
    old = report.write(path, Config(), _info("d1", "c1"), [_stage("ring", 20), _stage("shim", 20)])
    new = report.write(
        path, Config(), _info("d2", "c2"), [_stage("fanotify", 11)], only=["fanotify"], order=ORDER
    )
    assert new.index("(`ring`)") < new.index("(`fanotify`)") < new.index("(`shim`)")
    assert [r.split(" |")[0] for r in _targets(new)] == [
        "| `ring.goal`",
        "| `fanotify.goal`",
        "| `shim.goal`",
    ]
    assert _section(new, "shim") == _section(old, "shim")


def test_a_stage_without_targets_drops_its_old_rows(tmp_path) -> None:
    path = tmp_path / "B.md"
    _full(path)
    new = report.write(
        path,
        Config(),
        _info("d2", "c2"),
        [_stage("relay", 12, target=False)],
        only=["relay"],
        order=ORDER,
    )
    assert [r.split(" |")[0] for r in _targets(new)] == ["| `ring.goal`", "| `fanotify.goal`"]


def test_a_stages_run_without_a_report_writes_what_it_measured(tmp_path, capsys) -> None:
    path = tmp_path / "B.md"
    text = report.write(path, Config(), _info("d", "c"), [_stage("relay", 12)], only=["relay"])
    assert "(`relay`)" in text
    assert "(`ring`)" not in text
    # a file that is no report of ours is rewritten whole, and the run says so
    path.write_text("# notes of my own\n")
    text = report.write(path, Config(), _info("d", "c"), [_stage("relay", 12)], only=["relay"])
    assert text.startswith("# Benchmarks")
    assert "is not a report python -m bench wrote" in capsys.readouterr().out


def test_a_full_run_writes_everything(tmp_path) -> None:
    path = tmp_path / "B.md"
    _full(path)
    text = report.write(path, Config(), _info("d3", "c3"), [_stage("ring", 1)])
    assert "(`relay`)" not in text
    assert _targets(text) == [_targets(text)[0]]
    assert "| `ring.goal` | >= 10 | 1 ops/s" in _targets(text)[0]


def test_the_real_report_is_one_the_writer_can_merge_into(tmp_path) -> None:
    """BENCHMARKS.md as committed: a --stages run keeps every stage it did not run."""
    old = (Path(report.ROOT) / "BENCHMARKS.md").read_text()
    names = [n for n in ORDER if f"(`{n}`)\n" in old]
    assert "relay" in names
    assert report.merge(old, old, only=[], order=ORDER) == old
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(old)
    new = report.write(
        path, Config(), _info("d", "c"), [_stage("relay", 12)], only=["relay"], order=ORDER
    )
    for name in names:
        if name != "relay":
            assert _section(new, name) == _section(old, name), name
    assert "| `relay.speed` | 12.0 ops/s |" in _section(new, "relay")
    assert [r for r in _targets(new) if not r.startswith("| `relay.")] == [
        r for r in _targets(old) if not r.startswith("| `relay.")
    ]


def test_hand_written_subsections_outlive_every_rewrite(tmp_path) -> None:
    """A ``### ... (hand-written, DATE)`` subsection of a stage's section is kept by a
    ``--stages`` run of that stage and by a full run; other ``###`` text is not."""
    path = tmp_path / "B.md"
    old = _full(path)
    mine = ["### Profile before and after (hand-written, 2026-12-07)", "", "it was slow", ""]
    lines = old.split("\n")
    end = lines.index("## Targets")
    path.write_text("\n".join([*lines[:end], *mine, "### generated", "", "gone", "", *lines[end:]]))
    relay_before = _section(path.read_text(), "relay")
    text = report.write(
        path, Config(), _info("d2", "c2"), [_stage("fanotify", 7)], only=["fanotify"], order=ORDER
    )
    section = _section(text, "fanotify")
    assert "| `fanotify.speed` | 7 ops/s |" in section
    assert section.endswith("\n".join(mine[:-1]) + "\n")
    assert "gone" not in text
    assert _section(text, "relay") == relay_before
    # the report stays one the writer merges into unchanged
    assert report.merge(text, text, only=[], order=ORDER) == text
    text = report.write(
        path, Config(), _info("d3", "c3"), [_stage("ring", 1), _stage("fanotify", 2)]
    )
    assert _section(text, "fanotify").endswith("\n".join(mine[:-1]) + "\n")
    assert text.count("it was slow") == 1
