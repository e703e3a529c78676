"""The README's usage example runs, and .ci/run runs exactly the README's test command."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_readme_usage_example_runs():
    (code,) = _blocks("python")
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["z_inv"].shape == (256, 128)
    assert namespace["out"].gates.shape == (256, 2, 8)
    assert torch.isfinite(namespace["res"].loss)
    assert 0.0 <= float(namespace["redundancy"]) <= 1.0


def test_ci_runs_the_readme_test_command():
    main_job, test_command = [b.strip() for b in _blocks("bash")]
    ci = (ROOT / ".ci" / "run").read_text()
    (ci_command,) = re.findall(r"# BEGIN test command\n(.*?)\n# END test command", ci, re.S)
    assert ci_command.strip() == test_command
    assert "python examples/demo.py" in main_job and "torch==2.13.0" in main_job
