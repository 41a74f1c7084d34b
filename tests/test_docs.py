"""Every Python block of README.md and docs/*.md runs as written, as a user would run it.

Each block is saved as a plain script and run in a subprocess (no pytest in the process, so a
block that works only inside pytest fails here); blocks that define ``test_*`` functions run
under pytest with the dropspy plugin, as a user's test file would. The blocks of one document
run in order in one folder shared by all documents (README first), so a later block may read
the ``run.h5`` an earlier one wrote, exactly as a reader following the page would.

The only thing added to a block is placeholder data that the block names without defining
(``batches``, ``model``, ``x``, ``y``; in a block that imports transformers or Lightning, that
framework's own objects, see ``FRAMEWORK_PLACEHOLDERS``): each placeholder below says what it
stands for. A block using any other undefined name fails, so the docs cannot lean on something
the reader lacks; the block imports every class and module it calls itself. A block that reads
``MASTER_PORT`` gets a free port in its environment, so concurrent runs cannot collide.
A block preceded by ``<!-- sketch -->`` is an interface sketch (signatures without bodies) and
is not run.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKETCH = "<!-- sketch -->"

# Placeholder data a block may name without defining: the user's own batches, model and data.
PLACEHOLDERS = {
    "batches": (
        "import torch\n"
        "torch.manual_seed(0)\n"
        "batches = [(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(4)]\n"
    ),
    "model": (
        "import keras\n"
        "model = keras.Sequential([keras.Input((20, 8)), keras.layers.SpatialDropout1D(0.3),\n"
        "                          keras.layers.LSTM(4), keras.layers.Dense(1)])\n"
        "model.compile('adam', 'mse')\n"
    ),
    "x": "import numpy as np\nx = np.random.default_rng(0).random((64, 20, 8))\n",
    "y": "import numpy as np\ny = np.random.default_rng(1).random((64, 1))\n",
}
_NEEDS = {"batches": "torch", "model": "keras", "x": "numpy", "y": "numpy"}

# In a block that imports one of these frameworks, the user's objects are that framework's: the
# same name (``model``) stands for a different object than in a Keras block. All tiny, on CPU.
FRAMEWORK_PLACEHOLDERS = {
    "transformers": {
        # A tiny GPT-2 from a config (random weights: nothing downloaded).
        "model": (
            "import torch\n"
            "from transformers import GPT2Config, GPT2LMHeadModel\n"
            "torch.manual_seed(0)\n"
            "model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16,\n"
            "                                   n_layer=1, n_head=2))\n"
        ),
        "args": (
            "from transformers import TrainingArguments\n"
            "args = TrainingArguments(output_dir='hf-out', max_steps=2, report_to='none',\n"
            "                         per_device_train_batch_size=4, use_cpu=True,\n"
            "                         save_strategy='no')\n"
        ),
        "train_ds": (
            "import torch\n"
            "_ids = torch.randint(0, 32, (8, 12), generator=torch.Generator().manual_seed(1))\n"
            "train_ds = [{'input_ids': t, 'labels': t} for t in _ids]\n"
        ),
    },
    "lightning": {
        # A tiny LightningModule with dropout, trained and validated on 4 batches of 8.
        "module": (
            "import lightning\n"
            "import torch\n"
            "from torch import nn\n"
            "class _Module(lightning.LightningModule):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            "        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3),\n"
            "                                 nn.Linear(16, 1))\n"
            "    def training_step(self, batch, _):\n"
            "        return nn.functional.mse_loss(self.net(batch[0]), batch[1])\n"
            "    def validation_step(self, batch, _):\n"
            "        self.log('val_loss', nn.functional.mse_loss(self.net(batch[0]), batch[1]))\n"
            "    def configure_optimizers(self):\n"
            "        return torch.optim.SGD(self.parameters(), lr=0.1)\n"
            "torch.manual_seed(0)\n"
            "module = _Module()\n"
        ),
        "train_loader": (
            "import torch\n"
            "from torch.utils.data import DataLoader, TensorDataset\n"
            "train_loader = DataLoader(TensorDataset(torch.randn(32, 8), torch.randn(32, 1)),\n"
            "                          batch_size=8)\n"
        ),
        "val_loader": (
            "import torch\n"
            "from torch.utils.data import DataLoader, TensorDataset\n"
            "val_loader = DataLoader(TensorDataset(torch.randn(16, 8), torch.randn(16, 1)),\n"
            "                        batch_size=8)\n"
        ),
    },
}


def _placeholders(tree: ast.Module) -> tuple[dict[str, str], str | None]:
    """The placeholders for a block, and the framework they come from (None: the defaults)."""
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    for framework, names in FRAMEWORK_PLACEHOLDERS.items():
        if framework in imported:
            return names, framework
    return PLACEHOLDERS, None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _blocks(doc: Path) -> list[tuple[int, str, bool]]:
    """(line number, code, is_sketch) of every ```python block."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    out = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            sketch = i > 0 and lines[i - 1].strip() == SKETCH
            out.append((start + 1, "\n".join(lines[start:end]) + "\n", sketch))
            i = end
        i += 1
    return out


CASES = [(doc, line, code, sketch) for doc in DOCS for line, code, sketch in _blocks(doc)]


def _free_names(code: str) -> set[str]:
    """Names a block reads but never binds (imports, assignments, defs, arguments)."""
    tree = ast.parse(code)
    bound: set[str] = set(dir(builtins))
    loaded: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docs")


def _case_id(case: tuple[Path, int, str, bool]) -> str:
    return f"{case[0].name}:{case[1]}"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_python_block_runs_as_written(case, workdir):
    doc, line, code, sketch = case
    where = f"{doc.relative_to(ROOT)} line {line}"
    if sketch:
        pytest.skip("an interface sketch (<!-- sketch -->), not a program")
    tree = ast.parse(code)
    free = _free_names(code)
    placeholders, framework = _placeholders(tree)
    unknown = free - set(placeholders)
    assert not unknown, f"{where}: the block uses {sorted(unknown)}, which it never defines"
    for needed in ({framework} if framework else {_NEEDS[n] for n in free}):
        pytest.importorskip(needed)
    prelude = "".join(placeholders[n] for n in sorted(free))
    defines_tests = any(isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
                        for n in tree.body)
    name = re.sub(r"\W", "_", f"{doc.stem}_{line}")
    script = workdir / (f"test_block_{name}.py" if defines_tests else f"block_{name}.py")
    script.write_text(prelude + code, encoding="utf-8")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if "MASTER_PORT" in code:
        # The block's setdefault keeps a free port: a fixed one collides across parallel runs.
        env["MASTER_PORT"] = str(_free_port())
    if defines_tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (
        f"{where} failed (exit {proc.returncode}); blocks run in document order in one "
        f"folder, README first:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if defines_tests:
        assert re.search(r"\b[1-9]\d* passed", proc.stdout), proc.stdout[-2000:]


def test_every_document_with_python_has_a_runnable_block():
    # The docs keep their examples as ```python blocks; a rename of the fence would make this
    # test pass vacuously.
    assert sum(not c[3] for c in CASES if c[0].name == "README.md") >= 3
