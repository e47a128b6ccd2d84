"""gridrunner as a user gets it: a wheel installed into a fresh virtual environment (no editable install,
dependencies constrained by the lock), driven from a project folder outside the repository: the user's task
module, spec and profile, then make, submit, status, analyze, and the report opened in a real browser.

The install takes the `analysis` extra only (the user's task does not need TensorFlow), with pip's cache and
without compiling bytecode, so it costs seconds once `make test` has installed the lock (about a minute when
pip has to fetch every wheel)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements" / "cpu.lock"
CHROMIUM = Path("/usr/bin/chromium")
# Flags that let headless Chromium start as root on a machine without a display or network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                    ".hypothesis", ".pytest_cache")

USER_TASK = '''
"""A user's own training code: a noisy quadratic in x, better with optimizer "adam", logged as it trains."""
import random


def train(params, ctx):
    rng = random.Random(ctx.seed)
    score = 1.0 - (params["x"] - 0.3) ** 2 + (0.2 if params["optimizer"] == "adam" else 0.0)
    for step in range(1, 6):
        ctx.log(step, loss=1.0 / step + rng.random() * 0.01)
    if params["x"] > 0.9 and params["optimizer"] == "sgd":
        raise RuntimeError("diverged")
    return {"score": score + rng.gauss(0, 0.01), "train_loss": 0.2}
'''

USER_SPEC = '''
name: sweep
task: mytask:train
grid:
  x: [0.0, 0.25, 0.5, 0.75, 1.0]
  optimizer: [adam, sgd]
repeat: 3
max_len: 10
outcomes: [score, train_loss]
failure: score < 0.5
metric: score
goal: max
'''

USER_PROFILE = '''
executor: local
max_parallel: 2
lease_s: 30
'''


def clean_env(venv: Path) -> dict:
    """The environment of a user who activated ``venv``: nothing of this repository or the test's venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH") and not k.startswith("PYTEST")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["MPLBACKEND"] = "Agg"
    return env


def run(cmd, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    """Build the wheel, install it into a fresh venv and run the user's project; returns what came out."""
    root = tmp_path_factory.mktemp("user")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)  # a build writes build/ and *.egg-info into its source
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("gridrunner-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = clean_env(venv)
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", "-c", str(LOCK),
         f"{wheel}[analysis]"], root, env)

    project = root / "my project"  # a space in the path, as users' folders have
    project.mkdir()
    (project / "mytask.py").write_text(textwrap.dedent(USER_TASK))
    (project / "sweep.yaml").write_text(textwrap.dedent(USER_SPEC))
    (project / "profiles").mkdir()
    (project / "profiles" / "local.yaml").write_text(textwrap.dedent(USER_PROFILE))
    out = {"venv": venv, "env": env, "project": project, "wheel": wheel}
    out["make"] = run(["gridrunner", "make", "sweep.yaml"], project, env).stdout
    out["submit"] = run(["gridrunner", "submit", "--executor", "local", "--shards", "2", "--profile",
                         "profiles/local.yaml", "--wait"], project, env).stdout
    out["status"] = run(["gridrunner", "status"], project, env).stdout
    out["status_json"] = json.loads(run(["gridrunner", "status", "--json"], project, env).stdout)
    out["analyze"] = run(["gridrunner", "analyze"], project, env).stdout
    return out


@pytest.mark.slow
def test_a_users_project_runs_end_to_end_on_the_installed_wheel(user_project):
    project = user_project["project"]
    assert user_project["make"].startswith("runs/sweep: 30 rows in the spec")
    assert "profiles/local.yaml" in user_project["submit"]
    first = user_project["status"].splitlines()[0]
    assert first.startswith("sweep (runs/sweep): 30/30 finished") and first.endswith("ETA done")
    doc = user_project["status_json"]
    assert doc["finished"] and doc["counts"] == {"not_run": 0, "running": 0, "done": 27, "failed": 3}
    assert doc["failures"]["by_kind"] == {"RuntimeError": 3}
    assert "Grid sweep. Failure rule: score < 0.5" in user_project["analyze"]
    report = project / "runs" / "sweep" / "report"
    assert (report / "index.html").stat().st_size > 0 and (report / "report.md").exists()
    assert list(report.glob("*.png"))
    # What ran was the wheel's code, not this repository's.
    where = run([user_project["venv"] / "bin" / "python", "-c", "import gridrunner; print(gridrunner.__file__)"],
                project, user_project["env"]).stdout.strip()
    assert where.startswith(str(user_project["venv"])), where


@pytest.mark.slow
def test_the_install_takes_no_top_level_name_but_gridrunner(user_project):
    python = user_project["venv"] / "bin" / "python"
    for name in ("tasks", "analysis"):
        tried = subprocess.run([python, "-c", f"import {name}"], cwd=user_project["project"], env=user_project["env"],
                               capture_output=True, text=True)
        assert tried.returncode == 1 and f"ModuleNotFoundError: No module named '{name}'" in tried.stderr
    listed = run([python, "-m", "pip", "show", "-f", "gridrunner"], user_project["project"], user_project["env"]).stdout
    files = [line.strip() for line in listed.split("Files:", 1)[1].splitlines() if line.strip()]
    top = {path.split("/")[0] for path in files if not path.startswith("../")}
    assert top == {"gridrunner", user_project["wheel"].name.split("-py")[0] + ".dist-info"}, top
    assert [path for path in files if path.startswith("../")] == ["../../../bin/gridrunner"]
    with zipfile.ZipFile(user_project["wheel"]) as wheel:
        assert {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")} == {"gridrunner"}
        shipped = {n for n in wheel.namelist() if n.endswith(".py")}
    # Every module of the three folders is in the wheel, under gridrunner's name (a new subpackage that
    # setup.cfg's package list lacks would be missing).
    folders = {"gridrunner": "gridrunner", "tasks": "gridrunner/tasks", "analysis": "gridrunner/analysis"}
    sources = {f"{inside}/{path.relative_to(REPO / folder).as_posix()}"
               for folder, inside in folders.items() for path in (REPO / folder).rglob("*.py")}
    assert sources - shipped == set()


@pytest.mark.slow
def test_the_report_loads_every_image_and_logs_no_error_in_headless_chromium(user_project):
    if not CHROMIUM.exists():
        if os.environ.get("GRIDRUNNER_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    index = user_project["project"] / "runs" / "sweep" / "report" / "index.html"
    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
            page.goto(index.as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images, i => ({src: i.getAttribute('src'), "
                                   "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))")
        finally:
            browser.close()
    html = index.read_text(encoding="utf-8")
    assert len(images) == html.count("<img") > 0
    broken = [image for image in images if not (image["complete"] and image["width"] > 0 and image["height"] > 0)]
    assert broken == [], broken
    assert problems == []
