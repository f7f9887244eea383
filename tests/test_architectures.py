"""The layout's promises: one registry knows the model families (a new family is one file plus one
entry, proven here with a toy family), nothing else names a family, and the engine's imports form no
cycle."""

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

import clover_core as cc
from clover_core import architectures
from clover_core.architectures.base import Family, load_input, load_output, set_attributes, split_heads, split_output

from .tolerances import FP32

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clover_core"


# --------------------------------------------------------------------------- a toy family, registered at run time


class ToyAttention(nn.Module):
    """Plain multi-head self-attention with its own projections and the original softmax scale."""

    def __init__(self, d: int = 12, heads: int = 3, qk_dim: int = 4, v_dim: int = 4, scale: float = 0.5):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim, self.scale = heads, qk_dim, v_dim, scale
        self.q, self.k = nn.Linear(d, heads * qk_dim), nn.Linear(d, heads * qk_dim)
        self.v, self.o = nn.Linear(d, heads * v_dim), nn.Linear(heads * v_dim, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)  # (B, nh, T, qk)
        k = self.k(x).view(b, t, self.heads, -1).transpose(1, 2)  # (B, nh, T, qk)
        v = self.v(x).view(b, t, self.heads, -1).transpose(1, 2)  # (B, nh, T, v)
        att = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)  # (B, nh, T, T)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, -1))


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig()  # where the engine records how the model was pruned
        self.blocks = nn.ModuleList([ToyAttention(), ToyAttention()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class ToyAdapter:
    """The adapter protocol for :class:`ToyAttention`, written with the helpers of ``architectures.base``."""

    def factors(self, module):
        h = module.heads
        return {
            "qk": (split_heads(module.q.weight.T, module.q.bias, h), split_heads(module.k.weight.T, module.k.bias, h)),
            "vo": (split_heads(module.v.weight.T, module.v.bias, h), split_output(module.o.weight.T, h)),
        }

    def pruned(self, module, widths, *, share=False):
        d = module.q.in_features
        new = ToyAttention(
            d, module.heads, widths.get("qk", module.qk_dim), widths.get("vo", module.v_dim), module.scale
        )
        new.o.bias = module.o.bias if share else nn.Parameter(module.o.bias.detach().clone())
        return new

    def load_factors(self, module, factors, *, share=False):
        (qa, kb), (va, ob) = factors["qk"], factors["vo"]
        for proj, factor in ((module.q, qa), (module.k, kb), (module.v, va)):
            load_input(proj, factor, rank_major=False, share=share)
        load_output(module.o, ob, rank_major=False, share=share)
        set_attributes(module, qk_dim=qa.shape[-1], v_dim=va.shape[-1])

    def params_per_direction(self, module):
        d = module.q.in_features
        return {"qk": 2 * (d + 1), "vo": (d + 1) + d}

    def kv_width(self, module, ranks):
        return None


TOY = Family(name="toy", attention=ToyAttention, adapter=ToyAdapter(), kind="lm", model_class=ToyModel)


@pytest.fixture
def toy():
    architectures.register(TOY)
    try:
        torch.manual_seed(0)
        yield ToyModel().eval()
    finally:
        architectures.unregister("toy")


def test_a_family_is_unknown_until_registered():
    with pytest.raises(NotImplementedError, match="no supported attention module"):
        cc.decompose(ToyModel())


def test_a_registered_family_decomposes_and_prunes_like_the_others(toy):
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    assert architectures.family_of(toy) is TOY and architectures.kind_of(toy) == "lm"
    with torch.no_grad():
        torch.testing.assert_close(cc.prune(toy, ratio=0.0, target="both")(x), toy(x), **FP32)
        pruned = cc.prune(toy, ratio=0.5, target="both")
        assert not torch.allclose(pruned(x), toy(x), atol=1e-3)  # the ratio changes the outputs
    block, small = toy.blocks[0], pruned.blocks[0]
    assert small.q.out_features == small.v.out_features == 3 * 2  # 3 heads of 4 -> 2 directions each
    a, b = ToyAdapter().factors(block)["qk"]
    for head in range(3):  # each pruned head is the optimal rank-2 approximation of its own product
        product = a[head] @ b[head].T
        kept = ToyAdapter().factors(small)["qk"]
        approx = kept[0][head] @ kept[1][head].T
        s = torch.linalg.svdvals(product)  # an oracle independent of the engine
        assert math.isclose(torch.linalg.matrix_norm(product - approx).item(), s[2:].norm().item(), rel_tol=1e-4)
    assert set(cc.spectra(toy)) == {"blocks.0", "blocks.1"}


def test_a_family_is_registered_once(toy):
    with pytest.raises(ValueError, match="registered already"):
        architectures.register(TOY)
    with pytest.raises(TypeError, match="architectures.Family"):
        architectures.register("toy")


# --------------------------------------------------------------------------- what only architectures/ knows


def _python_files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*.py")))]


def _family_words() -> tuple[set[str], set[str]]:
    """The class names and the strings (model types, family names) that identify a registered family."""
    classes, strings = set(), set()
    for family in architectures.FAMILIES:
        classes |= {family.attention.__name__, *(c.__name__ for c in family.up_projections)}
        if family.model_class is not None:
            classes.add(family.model_class.__name__)
        if family.remote is not None:
            classes.add(family.remote.cls)
        strings |= {family.name, *family.model_types}
    return classes, strings


def test_nothing_outside_architectures_names_a_family():
    """The engine, the file formats, the CLI, the app and its backend ask the registry; only the offline
    model zoo, which builds particular models from particular files, names their classes."""
    classes, strings = _family_words()
    outside = [
        p
        for p in _python_files(PACKAGE, ROOT / "studio", ROOT / "app.py")
        if "architectures" not in p.parts and "zoo" not in p.parts
    ]
    found = []
    for path in outside:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            names += [node.id] if isinstance(node, ast.Name) else []
            names += [node.attr] if isinstance(node, ast.Attribute) else []
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n in classes]
            if isinstance(node, ast.Constant) and node.value in strings:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == []


def test_the_check_above_sees_a_family_name():
    """Sensitivity: the same scan over the architectures' own files finds their classes and types."""
    classes, strings = _family_words()
    text = (PACKAGE / "architectures" / "gpt2.py").read_text(encoding="utf-8")
    assert "GPT2Attention" in classes and "gpt2" in strings and "GPT2Attention" in text and '"gpt2"' in text


# --------------------------------------------------------------------------- imports


def _imports(path: Path) -> set[str]:
    """The ``clover_core`` modules ``path`` imports when it runs, at the top or inside a function (those
    under ``if TYPE_CHECKING:`` are for annotations only)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = set()
    for node in (n for n in ast.walk(tree) if id(n) not in typing_only):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import finetune` names a module
    return {m for m in found if m.split(".")[0] == "clover_core"}


def _graph() -> dict[str, set[str]]:
    paths = _python_files(PACKAGE)
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_engine_imports_form_no_cycle():
    graph = _graph()
    assert (
        "clover_core.io.stream" in graph and "clover_core.zoo.gguf" in graph["clover_core.zoo"]
    )  # it sees lazy imports
    # `from . import x` in a submodule reaches its own package's __init__, which Python has already run
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert _cycle(graph) is None


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_imports_without_gradio():
    """The web app's backend lives in studio/: the engine, its command line and its file formats run where
    gradio is not installed."""
    code = (
        "import sys\nsys.modules['gradio'] = None\nimport clover_core, clover_core.__main__, clover_core.io.stream\n"
        "assert not any(m.startswith(('gradio', 'studio', 'plotly')) for m in sys.modules if sys.modules[m])"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
