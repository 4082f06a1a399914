"""`pip install .` (not editable) into a fresh venv gives a working `omniid` package and command.

The fresh venv sees the dependencies of the test environment through a path file (so nothing is
downloaded); the editable link to this checkout that environment holds is not active there, so
`omniid` can only come from the install under test."""
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP = shutil.ignore_patterns(".git", ".venv*", ".comfyui", "__pycache__", "*.egg-info", "build", "tests",
                              "benchmarks", "docs", "workflows", "omniid-output", ".pytest_cache")


def run(args, **kw):
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_a_plain_install_into_a_fresh_venv_imports_every_part_and_runs_the_command(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=SKIP)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)           # pip and setuptools come from the test environment
    python = env_dir / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(source)])

    where = run([python, "-c", "import omniid, omniid.guidance.rb_guidance, omniid.training.trainer, "
                               "omniid.encoders.flame, omniid.cli.main; print(omniid.__file__)"], cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(site), where
    templates = run([python, "-c", "import importlib.resources as r; "
                                   "print(r.files('omniid.encoders.flame').joinpath('templates_grid.json').is_file())"])
    assert templates.strip() == "True"
    for command in ([env_dir / "bin" / "omniid", "--help"], [python, "-m", "omniid", "--help"]):
        usage = run(command, cwd=tmp_path).splitlines()[0]
        assert usage.startswith("usage: python -m omniid"), usage
        assert all(name in usage for name in ("serve", "run", "train", "convert")), usage
