"""Every stage module imports, and `python -m ezoforge` runs, without the serving and remote-judge packages: the GPU
check's machine (a stock CUDA PyTorch image plus `make gpu-bundle`'s wheels) has none of them, so whatever serves or
calls a judge is imported where it is used."""
import json
import subprocess
import sys

# What the bare image lacks and the bundle does not bring: import name -> distribution.
ABSENT = {"fastapi": "fastapi", "starlette": "starlette", "uvicorn": "uvicorn", "openai": "openai",
          "lmformatenforcer": "lm-format-enforcer", "lm_format_enforcer": "lm-format-enforcer", "vllm": "vllm",
          "llama_cpp": "llama-cpp-python"}
STAGE_MODULES = ("ezoforge.curate.run", "ezoforge.synth.run", "ezoforge.train.run", "ezoforge.train.merge",
                 "ezoforge.prefer.run", "ezoforge.eval.run", "ezoforge.export.run", "ezoforge.pipeline",
                 "ezoforge.stages", "ezoforge.cli")

# Runs in a fresh interpreter: the path finder stops seeing the absent packages and their metadata, so importing one
# raises ModuleNotFoundError and importlib.util.find_spec and importlib.metadata find nothing, as on a machine
# without them.
CHILD = """
import importlib, importlib.abc, json, re, runpy, sys
from importlib.machinery import PathFinder

absent, modules, argv = json.loads(sys.argv[1])
absent_dists = {re.sub(r"[-_.]+", "-", d).lower() for d in absent.values()}


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] in absent else PathFinder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        return (d for d in PathFinder.find_distributions(*args, **kwargs)
                if re.sub(r"[-_.]+", "-", d.metadata["Name"] or "").lower() not in absent_dists)

    def invalidate_caches(self):
        PathFinder.invalidate_caches()


sys.meta_path[:] = [Absent() if f is PathFinder else f for f in sys.meta_path]
failed = {}
for name in modules:
    try:
        importlib.import_module(name)
    except ImportError as e:
        failed[name] = f"{type(e).__name__}: {e}"
print("IMPORT ERRORS", json.dumps(failed), flush=True)
if argv:
    sys.argv = argv
    runpy.run_module("ezoforge", run_name="__main__")
"""


def without_servers(modules, argv=()) -> tuple[dict, subprocess.CompletedProcess]:
    """{module: import error} for `modules` imported without ABSENT; then `python -m ezoforge ARGV` if given."""
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([ABSENT, list(modules), list(argv)])],
                          capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("IMPORT ERRORS ")), None)
    assert line, proc.stdout + proc.stderr
    return json.loads(line.removeprefix("IMPORT ERRORS ")), proc


def test_stage_modules_and_the_cli_need_no_server_or_judge_client():
    # infer.serve imports fastapi at module level (it is the server): the same child must fail on it, or the
    # blocking would prove nothing.
    failed, proc = without_servers([*STAGE_MODULES, "ezoforge.infer.serve"], ["ezo", "train", "--help"])
    assert failed.pop("ezoforge.infer.serve") == "ModuleNotFoundError: No module named 'fastapi'"
    assert failed == {}
    assert proc.returncode == 0, proc.stderr
    assert "--max-steps" in proc.stdout  # `ezo train --help` printed its options
