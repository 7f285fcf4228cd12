"""The notebooks in ``tutorials/`` run from top to bottom.

Each notebook is executed by nbclient in a fresh ``python3`` kernel, ipykernel's
kernel for the interpreter that runs the tests (``pip install -e .[test]``
brings ipykernel and its kernelspec), with a temporary working directory and
temporary folder. Any cell error fails the test with the cell and its traceback.
The notebooks load the bundled offline model (``zoo.load("shapes-tiny")``);
``CAPTUM_ICLIP_ZOO_DIR`` reaches the kernel through the environment.

The notebooks are stored without outputs, so that the repository stays small
and their diffs readable; a test checks that too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
EXPECTED = {
    "ITSM_vs_IntegratedGradients.ipynb",
    "Masked_Max_Pooling_and_Dual_Projections.ipynb",
    "Evaluating_Explanations.ipynb",
}
CELL_TIMEOUT_S = 300  # generous: the machine running the tests may be shared and loaded
KERNEL_STARTUP_TIMEOUT_S = 120


def test_tutorials_are_present():
    # Guards the parametrised test below, which would silently run nothing on an empty glob.
    assert {path.name for path in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_tutorial_is_saved_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells)
    assert notebook.metadata["kernelspec"]["name"] == "python3"


def test_python3_kernel_runs_this_interpreter():
    # The notebooks must be checked against the environment under test, not whatever
    # other Python a stray kernelspec might point at.
    command = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert command[0] == sys.executable
    assert "ipykernel_launcher" in command


@pytest.fixture(scope="module")
def bundled_model() -> str:
    from captum_iclip import zoo

    assert "shapes-tiny" in zoo.available(), (
        f"the bundled model shapes-tiny is missing from {zoo.WEIGHTS_DIR}: train it with "
        "python -m captum_iclip.zoo.train, or point CAPTUM_ICLIP_ZOO_DIR at a folder that holds it"
    )
    return "shapes-tiny"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_tutorial_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundled_model: str):
    # The kernel inherits this environment. On a shared, oversubscribed CPU torch's
    # intra-op threads spin-wait on each other (tests/conftest.py pins the test process
    # to one thread for the same reason); the kernel is a separate process.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary folders
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        startup_timeout=KERNEL_STARTUP_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError (cell source and traceback) on any error

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    # Every figure a cell returns or shows is drawn, not just printed as "<Figure size ...>".
    rich_outputs = [output for cell in code_cells for output in cell.outputs if "data" in output]
    figures = [output for output in rich_outputs if output.data.get("text/plain", "").startswith("<Figure")]
    assert figures, "the tutorial draws no figure"
    assert all("image/png" in output.data for output in figures)
