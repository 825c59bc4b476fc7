"""The package's shape, checked on its source: the stage packages form a strict stack (every import, the
function-level ones included, points down or sideways, never up, and there is no cycle); DeepSpeed stays
behind train/engine.py; optional dependencies stay lazy; the config and command layers load no torch;
modules and functions stay short."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, run_env

PKG = ROOT / "rm_trainer"
# The stack, bottom first: a module may import its own layer and the layers below it. Each layer is a
# package, but the foundation: three leaf modules that import nothing of rm_trainer's but errors.
FOUNDATION = ("rm_trainer.errors", "rm_trainer.disk", "rm_trainer.demo")
LAYERS = (FOUNDATION, "rm_trainer.config", "rm_trainer.data", "rm_trainer.model", "rm_trainer.objectives",
          "rm_trainer.artifact", "rm_trainer.use", "rm_trainer.eval", "rm_trainer.train", "rm_trainer.cli")
# Optional dependencies, imported only inside the functions that need them, and why.
OPTIONAL = {
    "peft": "LoRA runs only (pip install 'rm_trainer[lora]')",
    "aiohttp": "rm-serve only (pip install 'rm_trainer[serve]')",
    "matplotlib": "the evaluation pictures only (pip install 'rm_trainer[eval]'); reports work without them",
    "wandb": "a logging sink some teams use; never required",
}
# the engine; the groups and Ulysses attention; the tiled MLP and the activation offload
DEEPSPEED_HOME = ("rm_trainer.train.engine", "rm_trainer.train.sequence_parallel", "rm_trainer.train.long_context")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import statement of a module."""
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, inner, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = base[:len(base) - child.level + 1]
                    stem = ".".join(base + ([child.module] if child.module else []))
                else:
                    stem = child.module or ""
                found.extend((f"{stem}.{a.name}", inner, child.lineno) for a in child.names)
                found.append((stem, inner, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def graph() -> dict[str, dict[str, bool]]:
    """module -> {module it imports: only at function level?}, within rm_trainer."""
    mods = modules()
    edges: dict[str, dict[str, bool]] = {m: {} for m in mods}
    for m, p in mods.items():
        for target, in_function, _ in imports(m, p):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target not in (m, "rm_trainer"):
                edges[m][target] = edges[m].get(target, True) and in_function
    return edges


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in ((names,) if isinstance(names, str) else names)):
            return i
    raise AssertionError(f"{module} is in no layer of the stack: add it to LAYERS")


def test_every_module_but_the_foundation_lives_in_a_package():
    """Nothing grows flat at rm_trainer/ again: a new concern joins a package of the stack."""
    flat = sorted(m for m in modules() if m.count(".") == 1 and not (PKG / m.split(".")[1]).is_dir())
    assert flat == sorted([*FOUNDATION, "rm_trainer.config"])


def cycles(edges: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            strong(v)
    return out


def test_the_packages_form_a_strict_stack_with_no_cycle():
    edges = graph()
    n_edges = sum(len(t) for t in edges.values())
    print(f"{len(edges)} modules, {n_edges} edges, {sum(f for t in edges.values() for f in t.values())} "
          "only at function level")
    assert cycles(edges) == []
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in edges.items() for b in targets if layer(b) > layer(a)]
    assert upward == []


def test_the_package_root_is_not_imported_for_its_lazy_names():
    """`from rm_trainer import X` inside the package may name a module, never a public function: the lazy
    root would hide an edge of the stack."""
    mods = modules()
    bad = [f"{m}:{line} imports rm_trainer.{t.rpartition('.')[2]}" for m, p in mods.items()
           for t, _, line in imports(m, p) if t.startswith("rm_trainer.") and t.count(".") == 1 and t not in mods]
    assert bad == []


def test_only_the_engine_imports_deepspeed_and_torch_distributed():
    mods = modules()
    found = sorted({m for m, p in mods.items() for t, _, _ in imports(m, p)
                    if t.split(".")[0] == "deepspeed" or t.startswith("torch.distributed")})
    assert found == sorted(DEEPSPEED_HOME)


def test_optional_dependencies_are_imported_inside_functions_only():
    mods = modules()
    top_level = [f"{m}:{line} imports {t}" for m, p in mods.items() for t, inner, line in imports(m, p)
                 if t.split(".")[0] in OPTIONAL and not inner]
    assert top_level == []


def test_modules_and_functions_stay_short():
    long = []
    for m, p in modules().items():
        src = p.read_text()
        if len(src.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{m}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert long == []


def loaded_after(statement: str) -> set[str]:
    """Top-level packages in sys.modules after running `statement` in a fresh interpreter."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    return set(json.loads(p.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", ["rm_trainer", "rm_trainer.config", "rm_trainer.cli.train_flags",
                                    "rm_trainer.cli.train", "rm_trainer.cli.parser"])
def test_the_config_and_command_layers_load_neither_torch_nor_transformers(module):
    assert not {"torch", "transformers", "deepspeed"} & loaded_after(f"import {module}")


@pytest.mark.parametrize("command", ["consolidate", "score", "serve", "eval", "export_hf", "estimate", "prepare"])
def test_every_command_answers_help_without_loading_torch(command):
    build = f"rm_trainer.cli.{command}.parser()" if command not in ("estimate", "prepare") else "None"
    assert "torch" not in loaded_after(f"import rm_trainer.cli.{command}; {build}")


def test_the_public_api_still_resolves_lazily():
    assert "torch" in loaded_after("from rm_trainer import load_reward_model, RewardModel, bradley_terry_loss")


def test_the_loop_owners_reach_deepspeed_only_through_an_engine():
    got = loaded_after("import rm_trainer.train.step, rm_trainer.train.logger, rm_trainer.train.evaluator, "
                       "rm_trainer.train.checkpointer")
    assert "deepspeed" not in got and "torch" in got
