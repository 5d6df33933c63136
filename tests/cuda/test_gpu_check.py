"""make gpu-check (scripts/gpu_check.py) itself, on the CPU: a section that raises or hangs
still leaves results.json and report.md and the next section runs; a hung section's whole
process group is killed; a test past its per-test limit fails and one stuck past it is
recorded while the rest run again; what comes back fits the device call; the one way to run
it is in --help; the pack is checked or its command printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import gpu_check  # noqa: E402
import gpu_check_parts as parts  # noqa: E402


def _check(tmp_path: Path, *flags: str, timeout: float = 300) -> tuple[int, str, dict]:  # type: ignore[type-arg]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    r = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--dry-run", "--out",
                        str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                        "--pack", str(tmp_path / "no-pack"), *flags],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    return r.returncode, r.stdout + r.stderr, results


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie is dead


def test_sections_that_raise_or_hang_still_leave_the_records(tmp_path: Path) -> None:
    """A section raising in this process (decode), one whose process raises (throughput),
    one hanging in this process (machine) and one hanging in its process group (compile,
    a child of its own included): each recorded with its cause, every other section run,
    the records written; injected on purpose, so the exit status is 0."""
    rc, out, res = _check(tmp_path, "--only", "machine,decode,throughput,compile",
                          "--inject-hang", "machine", "--budget", "machine=2",
                          "--inject-failure", "decode", "--inject-failure", "throughput",
                          "--inject-hang", "compile", "--budget", "compile=4")
    s = res["sections"]
    assert rc == 0, out
    assert (s["machine"]["status"], s["machine"]["injected"]) == ("timeout", "hang")
    assert (s["decode"]["status"], s["decode"]["injected"]) == ("failed", "failure")
    assert "injected failure" in s["decode"]["error"]
    assert s["throughput"]["status"] == "failed" and "injected failure" in s["throughput"]["error"]
    assert (s["compile"]["status"], s["compile"]["injected"]) == ("timeout", "hang")
    assert s["prepare"]["status"] == s["tests"]["status"] == "skipped"
    child = int((tmp_path / "work" / "compile-sleeper.pid").read_text())
    assert not _alive(child), "the hung section's grandchild outlived it"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| compile | timeout (hang injected)" in report and "| decode | failed (failure injected)" in report
    log = (tmp_path / "out" / "throughput.log").read_text()
    assert "RuntimeError: injected failure" in log and "b'" not in log  # text, not a bytes repr


def test_what_comes_back_fits_the_device_call(tmp_path: Path) -> None:
    """A dry run of the cheap sections: the records are at most 8 files in OUT itself, named
    in letters, digits, '.', '_' and '-'; the work folder stays outside; without gpu-pack/
    the exact command that makes it is printed and reported."""
    rc, out, res = _check(tmp_path, "--only", "machine,prepare,decode")
    assert rc == 0, out
    files = list((tmp_path / "out").rglob("*"))
    assert len(files) <= 8 and all(f.parent == tmp_path / "out" for f in files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)
    assert "make gpu-pack" in out and 'carry: ["gpu-pack"]' in out
    assert not res["sections"]["machine"]["data"]["pack"]["found"]
    assert "4:4:4" in res["sections"]["decode"]["data"]
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--dry-run", "--out",
                        str(tmp_path / "o2"), "--work", str(tmp_path / "o2" / "w")],
                       check=True, capture_output=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})


TIER = '''
import signal, time
import pytest

pytestmark = pytest.mark.cuda

def test_slow():
    time.sleep(30)

def test_stuck():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as a call no handler interrupts
    time.sleep(30)

def test_after():
    assert True
'''


def test_a_test_past_its_limit_fails_and_a_stuck_one_is_recorded_while_the_rest_run(tmp_path: Path) -> None:
    """Per-test limit 1 s: a sleeping test fails at its deadline and the run goes on; a test
    that no signal handler can stop ends the process after the grace (its stacks in the log),
    is recorded as TIMEOUT, and the tests after it run in a second pytest process."""
    (tmp_path / "test_tier.py").write_text(TIER)
    log = tmp_path / "tier.log"
    r = parts.run_tier(["test_tier.py"], log, budget=120, deadline=1.0,
                       env=parts.tier_env(tmp_path / "no-pack"), grace=1.0, cwd=tmp_path)
    outcomes = {k.split("::")[-1]: v for k, v in r["outcomes"].items()}
    assert outcomes == {"test_slow": "FAILED", "test_stuck": "TIMEOUT", "test_after": "PASSED"}, log.read_text()
    assert r["runs"] == 2 and not r["ok"]
    text = log.read_text()
    assert "ran past its --deadline of 1 s" in text and "Timeout" in text  # faulthandler's stacks


def test_pytest_verbose_output_is_read_as_it_comes() -> None:
    text = ("tests/a.py::test_x PASSED                [ 25%]\n"
            "tests/a.py::test_y[p-1] FAILED           [ 50%]\n"
            "tests/a.py::test_w \n[deadline] tests/a.py::test_w ran past its --deadline of 75 s\n"
            "FAILED                                   [ 75%]\n"
            "tests/b.py::test_z Timeout (0:00:16)!\nThread 0x1 (most recent call first):\n")
    outcomes, running, finished = parts.parse_verbose(text)
    assert outcomes == {"tests/a.py::test_x": "PASSED", "tests/a.py::test_y[p-1]": "FAILED",
                        "tests/a.py::test_w": "FAILED"}
    assert running == "tests/b.py::test_z" and not finished
    done = "tests/a.py::test_x PASSED [100%]\n===== 1 passed in 3.21s =====\n"
    assert parts.parse_verbose(done)[2]
    assert parts.slowest("12.50s call     tests/a.py::test_x\n0.20s setup    tests/a.py::test_y\n")[0] == \
        (12.5, "call", "tests/a.py::test_x")


def test_help_holds_the_one_way_to_run_it_and_the_budgets_fit() -> None:
    """--help: the command, the ignored path to carry, the output folder, the time limit;
    the sections' budgets sum to under 7 minutes with room for the machine's start-up."""
    text = gpu_check.__doc__ or ""
    for needed in ('command  "make gpu-check"', 'carry    ["gpu-pack"]', "timeout  480 s",
                   "--out defaults to $OUT", "make gpu-pack", "make gpu-check DRY_RUN=1"):
        assert needed in text, needed
    assert sum(gpu_check.BUDGETS.values()) <= 6.75 * 60 < 480
    assert set(gpu_check.BUDGETS) == set(gpu_check.SECTIONS) == set(gpu_check.DRY_BUDGETS)
    assert gpu_check.SECTIONS[-1] == "compile"
    test_file, name = parts.COMPILE_TEST.split("::")
    assert f"def {name}(" in (ROOT / test_file).read_text()


def test_the_pack_is_checked_or_its_command_given(tmp_path: Path) -> None:
    missing = parts.pack_status(tmp_path / "gpu-pack")
    assert not missing["found"] and "make gpu-pack" in missing["make_it"]
    pack = tmp_path / "gpu-pack"
    (pack / "src" / "train" / "c0").mkdir(parents=True)
    for k in range(3):
        (pack / "src" / "train" / "c0" / f"{k}.jpg").write_bytes(b"x" * 10)
    with tarfile.open(pack / "cifar10-subset.tar.gz", "w:gz") as t:
        t.add(pack / "src", arcname="cifar10-subset")
    found = parts.pack_status(pack)
    assert found["found"] and found["images"] == 3 and not found["pytest"]
    folder = parts.cifar_folder(pack / "cifar10-subset.tar.gz", tmp_path / "work")
    assert sorted(p.name for p in (folder / "train" / "c0").iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
