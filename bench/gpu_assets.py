"""What bench/gpu_check.sh needs besides wheels, for a GPU machine without a hub or ../shared.

    python bench/gpu_assets.py pack DIR          # here (make gpu-bundle): Llama 3 tokenizer, converted + Japanese prompts
    python bench/gpu_assets.py slim DIR --cuda 130   # here: bitsandbytes (CPU + that CUDA only), datatrove, smaller
    python bench/gpu_assets.py travel DIR        # here: DIR + the working tree against the 64 MiB a call carries
    python bench/gpu_assets.py model DIR OUT     # there: a random-weight Llama-3.1-8B-shaped model folder + tokenizer
    python bench/gpu_assets.py pairs OUT         # there: instruction/response rows for `ezo train`
    python bench/gpu_assets.py peak OUT -- CMD…  # there: run CMD, write its exit code and peak RSS to OUT (JSON)
    python bench/gpu_assets.py env [BUNDLE]      # there: versions, the card, bitsandbytes' library, unmet requirements
    python bench/gpu_assets.py nf4 MODEL OUT     # there: MODEL loaded as nf4 by `ezo generate`'s loader: 4-bit layers
    python bench/gpu_assets.py summary WORK RES MODEL  # there: gpu_check.json, with the evidence that each path ran

The tokenizer is converted here from the tiktoken file of `llama-models` with transformers' TikTokenConverter (the
GPU machine's minutes go to the GPU) and travels as its HF tokenizer.json, xz-compressed (1.7 MB of 17 MB).
"""
from __future__ import annotations

import argparse
import json
import lzma
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAGRAPHS = ROOT.parent / "shared" / "data" / "jglue" / "jsquad" / "wikipedia_paragraphs.jsonl"
XZ = "tokenizer.json.xz"
# Shards of the random model: the streaming merge works shard by shard, so the check gives it several.
SHARD = "1GB"
# What travels to the GPU machine with each call (the working tree and the bundle), and what is kept spare under it.
TRAVEL_LIMIT, TRAVEL_SPARE = 64 * 2**20, 4 * 2**20
# Llama 3.1's chat format: header, content, <|eot_id|> per turn.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                 " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Llama-3.1-8B: hidden 4,096, 32 heads over 8 KV heads, MLP 14,336, vocabulary 128,256.
SHAPE_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009)


def pack(out: Path) -> None:
    import llama_models.llama3.tokenizer as lt
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    out.mkdir(parents=True, exist_ok=True)
    meta = lt.Tokenizer.get_instance()
    backend = TikTokenConverter(vocab_file=str(Path(lt.__file__).parent / "tokenizer.model"), pattern=meta.pat_str,
                                extra_special_tokens=meta.special_tokens).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>")
    tok.chat_template = CHAT_TEMPLATE
    folder = out / "hf-tokenizer"
    tok.save_pretrained(folder)
    plain = folder / "tokenizer.json"
    with open(plain, "rb") as src, lzma.open(plain.with_name(XZ), "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain.unlink()
    lines = PARAGRAPHS.read_text(encoding="utf-8").splitlines()[:256]  # generate_bench.py's prompt source
    (out / "paragraphs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def slim(bundle: Path, cuda: str) -> None:
    """Rewrite two of the bundle's wheels without files the check never reads: bitsandbytes' native libraries for
    other CUDA, ROCm and XPU releases (0.50.2: 41 of its 43 MB; it loads the one named after torch.version.cuda, and
    the CPU one without CUDA), and datatrove's URL blocklist (17 of its 17.4 MB; only its URLFilter reads it, which
    curate does not use)."""
    [bnb] = bundle.glob("bitsandbytes-*.whl")
    with zipfile.ZipFile(bnb) as z:
        libs = {n for n in z.namelist() if re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", n)}
    keep = {"bitsandbytes/libbitsandbytes_cpu.so", f"bitsandbytes/libbitsandbytes_cuda{cuda}.so"}
    if not keep <= libs:
        sys.exit(f"--cuda {cuda} (the Makefile's BNB_CUDA): {bnb.name} has no {sorted(keep - libs)}; "
                 f"it has {sorted(libs)}")
    drop_members(bnb, libs - keep)
    [datatrove] = bundle.glob("datatrove-*.whl")
    drop_members(datatrove, {"datatrove/assets/url_filterblacklistsv0_3_0.tar.gz"})


def drop_members(wheel: Path, dropped: set[str]) -> None:
    """`wheel` rewritten in place without these files, in its archive and in its RECORD (the installer's list)."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w") as dst:
        missing = dropped - set(src.namelist())
        if missing:
            sys.exit(f"{wheel.name} has no {sorted(missing)}: see what it holds now and update bench/gpu_assets.py")
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if line.split(b",")[0].decode() not in dropped)
            dst.writestr(info, data)  # each entry keeps its compression and attributes
    tmp.replace(wheel)
    print(f"{wheel.name}: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB "
          f"({len(dropped)} of its files left out)")


def travel(bundle: Path) -> int:
    """What one call carries to the GPU machine: the bundle plus the working tree (tracked and untracked files that
    git does not ignore). Fails unless TRAVEL_SPARE stays free under TRAVEL_LIMIT."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    tree = sum((ROOT / f).stat().st_size for f in set(listed) if f and (ROOT / f).is_file())  # deleted files: gone
    carried = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    margin = TRAVEL_LIMIT - tree - carried
    mib = 2**20
    print(f"travels: {bundle.name} {carried / mib:.2f} MiB + working tree {tree / mib:.2f} MiB = "
          f"{(carried + tree) / mib:.2f} MiB of {TRAVEL_LIMIT / mib:.0f} MiB; margin {margin / mib:.2f} MiB "
          f"(at least {TRAVEL_SPARE / mib:.0f} MiB kept)")
    if margin < TRAVEL_SPARE:
        print(f"{bundle}: too large to carry with the working tree; the largest files:", file=sys.stderr)
        for f in sorted(bundle.rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else 0)[-5:]:
            print(f"  {f.stat().st_size / mib:6.2f} MiB  {f}", file=sys.stderr)
        return 1
    return 0


def tokenizer(assets: Path):
    """The Llama 3 tokenizer with the Llama 3.1 chat template, as `pack` converted it."""
    from transformers import AutoTokenizer

    folder = assets / "hf-tokenizer"
    if not (folder / "tokenizer.json").exists():
        with lzma.open(folder / XZ) as src, open(folder / "tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return AutoTokenizer.from_pretrained(folder)


def model(assets: Path, out: Path, layers: int, tiny: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2) if tiny else {}
    config = LlamaConfig(**{**SHAPE_8B, **small, "num_hidden_layers": layers})
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the card: never a float32 copy
    try:
        with device:
            m = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    m.save_pretrained(out, max_shard_size=SHARD)
    tokenizer(assets).save_pretrained(out)
    print(f"{out}: random Llama-3.1-8B {'vocabulary' if tiny else 'shape'}, {layers} layers, {sum(p.numel() for p in m.parameters()) / 1e9:.2f} B")


def peak(out: Path, cmd: list[str]) -> int:
    """Run `cmd`; record its exit code and its peak resident memory (the largest of it and its children)."""
    import resource
    import subprocess

    rc = subprocess.call(cmd)
    kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out.write_text(json.dumps({"cmd": cmd, "rc": rc, "peak_rss_gib": round(kib / 2**20, 3)}))
    return rc


def env(bundle: Path | None) -> int:
    """The versions that matter, the card, and what would stop the check later: a bitsandbytes without the library
    for this torch's CUDA (the bundle carries one: the Makefile's BNB_CUDA), and requirements of the bundle's
    packages (installed with --no-deps) that this machine does not meet. One JSON line on stdout."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, distribution, version

    import torch
    from packaging.requirements import Requirement

    def have(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    info = {"device": torch.cuda.get_device_name() if cuda else "cpu", "cuda": torch.version.cuda,
            **{n: have(n) for n in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes",
                                    "liger-kernel", "triton", "datasets", "huggingface-hub", "tokenizers", "ezoforge")}}
    status = 0
    if cuda and torch.version.cuda and importlib.util.find_spec("bitsandbytes"):
        tag = "".join(torch.version.cuda.split(".")[:2])  # 13.0 -> 130, as bitsandbytes names its libraries
        folder = Path(importlib.util.find_spec("bitsandbytes").origin).parent
        found = (folder / f"libbitsandbytes_cuda{tag}.so").exists()
        info["bitsandbytes_library"] = f"libbitsandbytes_cuda{tag}.so" if found else None
        if not found:
            print(f"bitsandbytes has no library for this torch's CUDA {torch.version.cuda}: make gpu-bundle "
                  f"BNB_CUDA={tag}", file=sys.stderr)
            status = 2
    dists = ["ezoforge"] + [w.name.split("-")[0] for w in sorted(bundle.glob("*.whl"))] if bundle else ["ezoforge"]
    unmet = {}
    for dist in dict.fromkeys(dists):
        for line in distribution(dist).requires or []:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            got = have(req.name)
            if got is None or not req.specifier.contains(got, prereleases=True):
                unmet.setdefault(dist, []).append(f"{req} (here: {got or 'missing'})")
    info["unmet_requirements"] = unmet
    print(json.dumps(info))
    return status


PROMPT = "日本の首都はどこですか？"


def nf4(model_dir: Path, out: Path) -> None:
    """The model loaded as `ezo generate --quantize nf4` loads it (ezoforge.models.load), what that load made (its
    bitsandbytes 4-bit layers), and its greedy reply to one prompt through the same engine."""
    import bitsandbytes as bnb

    from ezoforge.config import LlamaCppConfig
    from ezoforge.infer.engines import open_engine
    from ezoforge.infer.generate import Sampling, build_messages
    from ezoforge.models import load

    loaded = load(str(model_dir), quantize="nf4")
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    engine = open_engine("transformers", str(model_dir), None, LlamaCppConfig(), 1, lambda: loaded)
    reply = engine.complete([build_messages(PROMPT, None)], Sampling(max_new_tokens=16))[0]
    out.write_text(json.dumps({"quantize": loaded.quantize, "device": str(loaded.device),
                               "linear4bit_modules": len(layers),
                               "quant_types": sorted({str(getattr(m.weight, "quant_type", None)) for m in layers}),
                               "load_seconds": round(loaded.load_seconds, 1), "reply_tokens": reply.completion_tokens,
                               "finish_reason": reply.finish_reason}, ensure_ascii=False))
    print(f"{len(layers)} Linear4bit layers; reply: {reply.text!r}")


def summary(work: Path, res: Path, model_dir: Path) -> None:
    """gpu_check.json: the steps (rc, seconds, cap), the versions, each step's figures, and for each path the check
    exists for, the evidence that it ran, read from what the steps wrote (train's stats.json, the eval report, the
    nf4 load, the CUDA tests' results), not from their exit codes."""
    def load(path: Path):
        return json.loads(path.read_text()) if path.exists() else None

    def lines(path: Path) -> list[dict]:
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    env, steps = load(work / "env.json") or {}, {r.pop("step"): r for r in lines(work / "steps.jsonl")}
    tests: dict[str, dict] = {}
    for row in lines(res / "gpu_tests.jsonl"):  # the last line of a test is its outcome; "started" alone: cut short
        tests[row["test"].rpartition("::")[2]] = row
    train, report, quantized = load(work / "train" / "stats.json"), load(work / "eval-nf4" / "report.json"), \
        load(res / "nf4.json")
    kernels = (train or {}).get("kernels") or {}
    triton = kernels.get("triton_kernels") or []
    cuda = env.get("device", "cpu") != "cpu"

    def verdict(shown: bool, test: str | None = None, cuda_only: bool = True) -> str:
        """"ran" where the steps' records show the path ran and its CUDA test, if any, passed."""
        row = tests.get(test) if test else None
        if cuda_only and not cuda:
            return "skipped: no CUDA" + (f" ({row['reason']})" if row and row.get("reason") else "")
        if test and cuda:
            if row is None or row["outcome"] == "started":
                return f"{test}: {'cut short' if row else 'not run'}"
            if row["outcome"] != "passed":
                return f"{test} {row['outcome']}: {row.get('reason') or row.get('error', '')}"
        return "ran" if shown else "not shown to run"

    stats, scored = train or {}, (report or {}).get("model", {})
    paths = {
        "trl_triton_fused_lm_head": {
            "verdict": verdict(kernels.get("fused_lm_head") is True and any(k.startswith("trl.") for k in triton),
                               "test_fused_lm_head_runs_in_triton_and_matches_the_plain_loss_on_cuda"),
            "fused_lm_head": kernels.get("fused_lm_head"),
            "triton_kernels": [k for k in triton if k.startswith("trl.")]},
        "liger": {
            "verdict": verdict(bool(kernels.get("liger_modules")) and any(k.startswith("liger") for k in triton),
                               "test_liger_kernels_patch_the_model_and_train_on_cuda"),
            "liger_modules": kernels.get("liger_modules"),
            "triton_kernels": [k for k in triton if k.startswith("liger")]},
        "packed_rows_sdpa": {  # on a CPU, --tiny's training still packs rows through SDPA
            "verdict": verdict(kernels.get("attention") == "sdpa" and stats.get("examples", 0) > stats.get("rows", 0),
                               "test_packed_rows_stay_apart_through_sdpa_on_cuda", cuda_only=False),
            "attention": kernels.get("attention"), "examples": stats.get("examples"), "rows": stats.get("rows"),
            "device": stats.get("device")},
        "nf4_eval": {
            "verdict": verdict(scored.get("quantize") == "nf4" and bool((quantized or {}).get("linear4bit_modules")),
                               cuda_only=False),
            "eval_quantize": scored.get("quantize"), "perplexity": (report or {}).get("perplexity"),
            "nf4_load": quantized},
        "stage_processes_cuda": {"verdict": verdict(True, "test_each_stage_gives_its_cuda_memory_back")},
    }
    merge = load(res / "merge_peak.json")
    shards = sorted(f.stat().st_size for f in model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    out = {"env": env, "steps": steps, "steps_seconds": sum(s["seconds"] for s in steps.values()),
           "ok": bool(steps) and all(s["rc"] == 0 for s in steps.values())
           and all(p["verdict"] == "ran" or (not cuda and p["verdict"].startswith("skipped: no CUDA"))
                   for p in paths.values()),
           "paths": paths, "tests": {name: row["outcome"] for name, row in tests.items()}, "ezo_train": train,
           "ezo_merge": merge and {"peak_rss_gib": merge["peak_rss_gib"], "model_gb": round(sum(shards) / 1e9, 2),
                                   "largest_shard_gb": round(max(shards, default=0) / 1e9, 2)},
           "generate_bench": load(work / "generate_bench.json")}
    text = json.dumps(out, ensure_ascii=False)
    (res / "gpu_check.json").write_text(text + "\n", encoding="utf-8")
    print(text)


def pairs(out: Path) -> None:
    from importlib.resources import files

    rows = [json.loads(line) for line in files("ezoforge").joinpath("data/tasks/demo-tasks.jsonl")
            .read_text(encoding="utf-8").splitlines()]
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(8):  # enough rows for a few packed steps
            for r in rows:
                f.write(json.dumps({"instruction": r["input"], "response": r["output"]}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["pack", "slim", "travel", "model", "pairs", "peak", "env", "nf4", "summary"])
    ap.add_argument("paths", nargs="*", help="peak: OUT -- CMD…")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="model: widths of 64 (CPU check of the script)")
    ap.add_argument("--cuda", default="130", help="slim: the CUDA release of the GPU image's torch, as bitsandbytes "
                    "names its library (13.0: 130)")
    a = ap.parse_args()
    paths = [Path(x) for x in a.paths[:3]]
    sys.exit({"pack": lambda: pack(paths[0]), "slim": lambda: slim(paths[0], a.cuda),
              "travel": lambda: travel(paths[0]), "model": lambda: model(paths[0], paths[1], a.layers, a.tiny),
              "pairs": lambda: pairs(paths[0]), "peak": lambda: peak(paths[0], a.paths[1:]),
              "env": lambda: env(paths[0] if paths else None), "nf4": lambda: nf4(paths[0], paths[1]),
              "summary": lambda: summary(*paths)}[a.what]())
