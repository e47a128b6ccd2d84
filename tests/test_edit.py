"""`gridrunner edit`: a real editor-like command edits a copy; on save the changes are merged into the
shard under its lock, as a three-way merge against the version opened; conflicts are explained and no
result is lost."""
from __future__ import annotations

import csv
import io
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gridrunner.cli import main
from gridrunner.spec import row_id_of
from gridrunner.worker import Worker
from gridtools import make_grid

SPEC = {"task": "gridrunner.tasks.toy:noop", "grid": {"a": [1, 2, 3, 4, 5, 6]}, "outcomes": ["value"]}


@pytest.fixture
def grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = make_grid(tmp_path, SPEC)
    Worker(path, shard=0, steal=False, max_rows=2, inline=True, handle_signals=False).run()  # rows a=1, a=2 done
    return path


def _rows(grid: Path) -> dict[str, dict]:
    text = (grid / "shards" / "shard-000.csv").read_text()
    records = [r for r in csv.reader(io.StringIO(text)) if r]
    return {r[1]: dict(zip(records[0], r)) for r in records[1:]}


def _edit(grid: Path, command: str):
    return CliRunner().invoke(main, ["edit", "--grid", str(grid), "--command", command])


def _script(tmp_path: Path, body: str) -> str:
    """An editor: a Python script that rewrites the file it is given in place, as an editor saves."""
    path = tmp_path / "editor.py"
    path.write_text("import sys\npath = sys.argv[-1]\ntext = open(path).read()\n" + body +
                    "open(path, 'w').write(text)\n")
    return f"{sys.executable} {path}"


def test_an_editor_script_resets_a_row_deletes_one_and_appends_one(grid, tmp_path):
    id1, id3, id4 = (row_id_of({"a": a}) for a in (1, 3, 4))
    body = (f"lines = text.splitlines(keepends=True)\n"
            f"lines = [l.replace(',done,', ',not_run,') if '{id1}' in l else l for l in lines if '{id3}' not in l]\n"
            f"text = ''.join(lines) + '9,,not_run,0,,,,,,\\n'\n")
    result = _edit(grid, _script(tmp_path, body))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == ("shard-000.csv was edited: applied 1 added row, applied 1 deletion, "
                                             "applied 1 reset")
    rows = _rows(grid)
    assert rows[id1]["status"] == "not_run" and rows[id1]["value"] == ""
    assert id3 not in rows and rows[id4]["status"] == "not_run" and row_id_of({"a": 9}) in rows


def test_a_row_a_worker_finished_while_the_editor_was_open_keeps_its_result_and_the_conflict_is_explained(grid, tmp_path):
    """The user deletes row a=3 and changes row a=4's parameter while a worker finishes both."""
    id3, id4 = row_id_of({"a": 3}), row_id_of({"a": 4})
    finisher = tmp_path / "finish.py"
    finisher.write_text(
        "import sys\nfrom gridrunner.store import GridStore, Result\n"
        "store = GridStore(sys.argv[1])\npath = store.shard_paths()[0]\n"
        "for _ in range(2):\n"
        "    _, scan = store.claim(path, 'host:1', lambda *a: False, 3)\n"
        "    store.record(scan.claim, Result('done', {'value': 0.123456789012345678}))\n")
    body = (f"import subprocess\nsubprocess.run([sys.executable, {str(finisher)!r}, {str(grid)!r}], check=True)\n"
            f"lines = text.splitlines(keepends=True)\n"
            f"lines = [l.replace('4,{id4}', '40,{id4}') for l in lines if '{id3}' not in l]\n"
            f"text = ''.join(lines)\n")
    result = _edit(grid, _script(tmp_path, body))
    assert result.exit_code == 0, result.output
    rows = _rows(grid)
    assert rows[id3]["status"] == "done" and rows[id4]["status"] == "done"
    assert float(rows[id3]["value"]) == 0.12345678901234568
    assert f"row {id3}: you deleted it, but it was done meanwhile; kept its result" in result.output
    assert f"row {id4}: you changed it, and meanwhile it became done" in result.output
    assert row_id_of({"a": 40}) not in rows


@pytest.mark.parametrize("tool", ["sed", "ed", "vim"])
def test_real_editors_edit_a_shard(grid, tmp_path, tool):
    """sed -i, ed and vim -es (where installed), each resetting row a=2 and changing row a=5's parameter."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    id2, id5 = row_id_of({"a": 2}), row_id_of({"a": 5})
    script = tmp_path / "cmds"
    if tool == "sed":
        command = f"sed -i -e '/{id2}/s/,done,/,not_run,/' -e 's/^5,{id5}/50,{id5}/'"
    elif tool == "ed":
        script.write_text(f"/{id2}/s/,done,/,not_run,/\n/^5,{id5}/s/^5,/50,/\nw\nq\n")
        command = f"sh -c 'ed -s \"$0\" < {script}'"
    else:
        command = f"vim -es -u NONE -c '%s/^\\(2,{id2}\\),done,/\\1,not_run,/' -c '%s/^5,{id5}/50,{id5}/' -c 'wq'"
    result = _edit(grid, command)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "shard-000.csv was edited: applied 1 reset, applied 1 parameter change"
    rows = _rows(grid)
    assert rows[id2]["status"] == "not_run" and id5 not in rows and rows[row_id_of({"a": 50})]["status"] == "not_run"


def test_an_editor_that_fails_or_breaks_the_header_changes_nothing(grid, tmp_path):
    shard = grid / "shards" / "shard-000.csv"
    before = shard.read_bytes()
    failed = _edit(grid, f"{sys.executable} -c 'import sys; sys.exit(4)'")
    assert failed.exit_code == 1 and "exited with status 4; shard-000.csv is unchanged" in failed.output
    broken = _edit(grid, _script(tmp_path, "text = text.replace('row_id,', 'id,', 1)\n"))
    assert broken.exit_code == 1 and "shard-000.csv is unchanged and your version is kept in " in broken.output
    assert shard.read_bytes() == before
    assert _edit(grid, "true").output == "shard-000.csv: no change\n"


def test_edit_without_an_editor_says_how_to_name_one(grid, monkeypatch):
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.delenv("EDITOR", raising=False)
    result = CliRunner().invoke(main, ["edit", "--grid", str(grid)])
    assert result.exit_code == 1
    assert result.output == "Error: no editor: set $VISUAL or $EDITOR, or pass --command 'CMD' (the file's path is " \
                            "added)\n"



@pytest.mark.parametrize("command, message", [
    ('vim "', "Error: the editor command 'vim \"' cannot be split into words as a shell would (No closing "
              "quotation); quote it as you would in a shell\n"),
    (" ", "Error: the editor command ' ' is empty: name an editor (set $VISUAL or $EDITOR, or pass --command "
          "'CMD')\n"),
    ("./notes.yaml", "Error: cannot run the editor './notes.yaml' (Permission denied); shard-000.csv is unchanged "
                     "(set $VISUAL or $EDITOR, or pass --command)\n"),
    ("{tmp}", "Error: cannot run the editor '{tmp}' (Permission denied); shard-000.csv is unchanged (set $VISUAL or "
              "$EDITOR, or pass --command)\n"),
    ("rm", "Error: the editor (rm) deleted the file it was given; shard-000.csv is unchanged\n"),
])
def test_regression_an_editor_command_that_cannot_run_is_one_error_line_and_leaves_no_copy(grid, tmp_path, monkeypatch,
                                                                                            command, message):
    # was: exit 3 with "ValueError: No closing quotation" (shlex), an attempt to execute the shard's copy (' '),
    # "PermissionError" (a file that is not executable, a directory); the editor that deleted the file left its
    # /tmp/gridrunner-edit-* directory behind
    (grid.parent.parent / "notes.yaml").write_text("not a program\n")  # in the working directory, not executable
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    shard = grid / "shards" / "shard-000.csv"
    before = shard.read_bytes()
    command, message = command.format(tmp=tmp_path), message.format(tmp=tmp_path)
    result = _edit(grid, command)
    assert (result.exit_code, result.output) == (1, message)
    assert shard.read_bytes() == before
    assert list(temp.iterdir()) == []
