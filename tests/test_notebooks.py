"""The notebooks in notebooks/ run top to bottom (tiny CPU settings) and show what they claim."""

import json
from pathlib import Path

import pytest

from tests.conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

# Appended to a copy of the notebook: prints the named expressions as one JSON line the test reads back.
REPORT = "RESULTS:"


def run_notebook(name: str, workdir, report: dict[str, str]) -> tuple[list, dict]:
    """Executes notebooks/NAME in `workdir` (the kernel inherits the 8 fake devices of conftest);
    returns the executed cells and the values of the `report` expressions."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    fields = ", ".join(f"{key!r}: {expr}" for key, expr in report.items())
    nb.cells.append(nbformat.v4.new_code_cell(f"import json\nprint({REPORT!r}, json.dumps({{{fields}}}))"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()
    (text,) = [o["text"] for o in nb.cells[-1].outputs if o.get("name") == "stdout"]
    line = next(line for line in text.splitlines() if line.startswith(REPORT))
    return nb.cells[:-1], json.loads(line[len(REPORT):])


def outputs(cells, kind: str) -> list:
    return [o for c in cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


@pytest.mark.slow
def test_quickstart_notebook_trains_plots_and_generates(tmp_path):
    cells, got = run_notebook("quickstart.ipynb", tmp_path, {
        "size": "SIZE", "losses": "losses", "png": "str(png.resolve())", "step": "step",
        "config_steps": "config.train.steps", "new_ids": "new_ids", "completions": "completions",
        "prompts": "PROMPTS", "max_new": "MAX_NEW_TOKENS", "evals": "len(read_metrics(WORKDIR)['eval_loss'])"})
    assert got["size"] == "cpu" and got["step"] == got["config_steps"] == 30
    assert got["evals"] == 3  # steps 10, 20 and 30: the plot's eval panel has points
    assert len(got["losses"]) >= 3 and got["losses"][-1] < got["losses"][0]
    assert got["png"].startswith(str(tmp_path.resolve())) and Path(got["png"]).stat().st_size > 0
    assert outputs(cells, "image/png"), "the loss plot is not displayed"
    assert len(got["completions"]) == len(got["prompts"]) == len(got["new_ids"])
    for ids, text in zip(got["new_ids"], got["completions"], strict=True):
        assert 1 <= len(ids) <= got["max_new"] and isinstance(text, str) and text


@pytest.mark.slow
def test_optax_transforms_notebook_trains_with_every_optimizer(tmp_path):
    cells, got = run_notebook("optax_transforms.ipynb", tmp_path, {
        "devices": "mesh.size", "results": "results", "phases": "sorted(set(phases))", "silent": "silent"})
    assert got["devices"] == 8
    assert set(got["results"]) == {"optax.adam (exact pmean)", "onebit_adam, never frozen", "onebit_adam",
                                   "zero_one_adam", "onebit_lamb"}
    for name, losses in got["results"].items():
        assert sum(losses[-10:]) / 10 < 0.5 * losses[0], name
    assert got["phases"] == [0, 1, 2, 3] and got["silent"] > 0  # every 0/1 Adam phase ran, some steps were silent
    assert outputs(cells, "image/png"), "the loss plot is not displayed"


# Makes `jaxllm` unimportable (as on a fresh runtime) and replaces the %pip magic by one that records what it
# was asked to install, then lets the real jaxllm import as if it had been installed.
FRESH_RUNTIME = """
import os, sys
INSTALLS = []

def _record_pip(line):
    INSTALLS.append(line)
    sys.modules.pop("jaxllm", None)

get_ipython().register_magic_function(_record_pip, "line", "pip")
"""


def _scenario(cwd, source, fresh):
    env = f"os.environ[{'JAXLLM_SOURCE'!r}] = {source!r}" if source else "os.environ.pop('JAXLLM_SOURCE', None)"
    block = "sys.modules['jaxllm'] = None" if fresh else "sys.modules.pop('jaxllm', None)"
    return f"INSTALLS.clear()\nos.chdir({str(cwd)!r})\n{env}\n{block}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart.ipynb", "optax_transforms.ipynb"])
def test_install_cell_installs_from_the_documented_source(name, tmp_path):
    """The install cell as on a fresh runtime: JAXLLM_SOURCE when set, else the checkout the notebook is
    opened from; outside a checkout without it, one clear error; nothing when jaxllm is importable."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    (install,) = [c for c in nb.cells if c.cell_type == "code" and "JAXLLM_SOURCE" in c.source]
    url = "git+https://example.org/jaxllm.git"
    scenarios = [(REPO / "notebooks", None, True), (tmp_path, url, True), (tmp_path, None, True),
                 (tmp_path, None, False)]
    cells = [nbformat.v4.new_code_cell(FRESH_RUNTIME)]
    for scenario in scenarios:
        cells += [nbformat.v4.new_code_cell(_scenario(*scenario)), nbformat.v4.new_code_cell(install.source),
                  nbformat.v4.new_code_cell("print(INSTALLS)")]
    run = nbformat.v4.new_notebook(cells=cells)
    nbclient.NotebookClient(run, kernel_name="python3", timeout=120, allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    results = []
    for i in range(len(scenarios)):
        ran, shown = run.cells[2 + 3 * i], run.cells[3 + 3 * i]
        errors = [o for o in ran.outputs if o.output_type == "error"]
        printed = [o["text"] for o in shown.outputs if o.get("name") == "stdout"]
        results.append((errors[0]["evalue"] if errors else None, printed[0].strip() if printed else None))
    assert results[0] == (None, repr([f'install -q "{REPO}"']))  # the checkout around notebooks/
    assert results[1] == (None, repr([f'install -q "{url}"']))
    assert results[2][0].startswith("jaxllm is not installed and this notebook is not inside a checkout: "
                                    "set JAXLLM_SOURCE") and results[2][1] == "[]"
    assert results[3] == (None, "[]")  # importable: nothing installed
