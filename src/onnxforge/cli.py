"""`onnxforge`: generate text, inspect artifacts, benchmark variants, build recipes.

Only the `build` command touches the build stack (torch & co.); the others
use the runtime alone, so they work on a machine with the `runtime` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_TEXT_ARTIFACT = "artifacts/gpt2-tiny/kv"


def _generate(args) -> int:
    from .runtime.text import SamplingSettings, TextGenerator

    settings = SamplingSettings(max_new_tokens=args.max_tokens, greedy=args.greedy, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                seed=args.seed, stop=tuple(args.stop))
    gen = TextGenerator(args.artifact, threads=args.threads)
    result = gen.generate(" ".join(args.word), settings, use_template=not args.raw)
    if args.json:
        print(json.dumps({"prompt": result.prompt, "text": result.text, "tokens": len(result.token_ids),
                          "finish_reason": result.finish_reason, "prefill_ms": round(result.prefill_ms, 2),
                          "artifact": str(gen.artifact.dir)}))
    else:
        print(result.text)
    return 0


def _inspect(args) -> int:
    from .runtime import artifact as art

    a = art.load(args.artifact, check_hashes=not args.no_verify)
    if args.json:
        print(json.dumps(a.manifest, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    m = a.manifest
    con = Console()
    info = m["artifact"]
    con.print(f"[bold]{info['recipe']} / {info['variant']}[/] version [cyan]{info['version']}[/] "
              f"({info['bytes_on_disk'] / 2**20:.1f} MiB, built {info['created']})  {a.dir}")
    src = m["source"]
    con.print(f"source: {src.get('kind')} {src.get('repo', '')} {src.get('revision', '')} "
              f"weights sha256 {src.get('weights_sha256', '')[:16]}…  recipe digest {m['recipe']['digest'][:16]}…")
    con.print("toolchain: " + ", ".join(f"{k} {v}" for k, v in m["toolchain"].items()))
    stages = Table(title="stages")
    for col in ("stage", "digest", "parameters and records"):
        stages.add_column(col)
    for s in m["stages"]:
        rest = {k: v for k, v in s.items() if k not in ("stage", "digest")}
        stages.add_row(s["stage"], s["digest"], json.dumps(rest)[:200])
    con.print(stages)
    for name, comp in m["components"].items():
        t = Table(title=f"component {name}: {comp['file']} (opset {comp['opset']})")
        for col in ("io", "name", "dtype", "shape"):
            t.add_column(col)
        for kind in ("inputs", "outputs"):
            for v in comp[kind]:
                t.add_row(kind[:-1], v["name"], v["dtype"], str(v["shape"]))
        con.print(t)
        for f in comp["files"]:
            con.print(f"  {f['file']}: {f['bytes']:,} bytes, sha256 {f['sha256'][:16]}…")
    val = Table(title=f"validation: {'passed' if m['validation'].get('passed') else 'FAILED'}")
    for col in ("check", "value", "limit", "ok"):
        val.add_column(col)
    for c in m["validation"].get("checks", []):
        val.add_row(c["check"], str(c["value"]), str(c["limit"]), "yes" if c["passed"] else "NO")
    con.print(val)
    extra = {k: v for k, v in m["validation"].items() if k not in ("checks", "passed", "greedy_tokens")}
    if extra:
        con.print("validation records: " + json.dumps(extra))
    if m.get("benchmark"):
        b = m["benchmark"]
        con.print(f"benchmark: decode {b['decode_ms_per_token']['mean']:.2f} ms/token (p95 {b['decode_ms_per_token']['p95']:.2f}), "
                  f"prefill p50 {b['prefill_ms']['p50']:.1f} ms, {b['tokens_per_s']} tokens/s, peak RSS {b['peak_rss_mib']} MiB "
                  f"({b['measured']})")
    else:
        con.print("benchmark: not measured (run `onnxforge bench`)")
    con.print("runtime: " + json.dumps(m["runtime"]))
    return 0


def _bench(args) -> int:
    from .bench import bench_variants
    from .runtime.artifact import resolve

    root = Path(args.artifacts)
    if args.artifact:
        paths = {}
        for item in args.artifact:
            name, _, path = item.rpartition("=")
            paths[name or Path(path).name] = resolve(path)
    else:
        recipe_dir = root / args.recipe
        if not recipe_dir.is_dir():
            raise ValueError(f"no built recipe {args.recipe!r} under {root}: build it first (`doit build recipes={args.recipe}`)")
        paths = {d.name: resolve(d) for d in sorted(recipe_dir.iterdir())
                 if d.is_dir() and not d.name.startswith(".") and d.name != "bench"}
    if args.runs < 1 or args.new_tokens < 2 or args.prompt_tokens < 1:
        raise ValueError("runs must be >= 1, new tokens >= 2 and prompt tokens >= 1")
    out = Path(args.out) if args.out else root / (args.recipe or "adhoc") / "bench" / "manual"
    bench_variants(paths, out, runs=args.runs, warmup=args.warmup, prompt_tokens=args.prompt_tokens,
                   new_tokens=args.new_tokens, threads=args.threads)
    print(f"saved {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


def _build(args) -> int:
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    import importlib.util

    spec = importlib.util.spec_from_file_location("dodo", Path(args.dodo))
    if spec is None or not Path(args.dodo).is_file():
        raise ValueError(f"{args.dodo}: no dodo.py here; run from the project root or pass --dodo")
    dodo = importlib.util.module_from_spec(spec)
    cmd = ["build"] + ([f"recipes={','.join(args.recipes)}"] if args.recipes else [])
    sys.argv = ["doit"] + cmd  # doit reads `recipes=` from argv while loading dodo
    spec.loader.exec_module(dodo)
    return DoitMain(ModuleTaskLoader(dodo)).run(cmd)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write a creative image prompt (or any text) from a word",
                       description="Turn a word into a creative image prompt with a GPT-2 artifact (onnxruntime only).")
    g.add_argument("word", nargs="+", help="the word or phrase to start from")
    g.add_argument("--artifact", default=DEFAULT_TEXT_ARTIFACT,
                   help=f"variant folder (newest version) or version folder (default: {DEFAULT_TEXT_ARTIFACT})")
    g.add_argument("--raw", action="store_true", help="use the text as the prompt, without the creative template")
    g.add_argument("--max-tokens", type=int, default=48, help="new tokens at most (default 48)")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature, top-k, top-p)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature > 0 (default 0.8)")
    g.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens, 0 = off (default 50)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1] (default 0.95)")
    g.add_argument("--repetition-penalty", type=float, default=1.2, help="penalty for repeated tokens, 1 = off (default 1.2)")
    g.add_argument("--stop", action="append", default=[], help="stop when this string appears (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    g.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    g.add_argument("--json", action="store_true", help="print a JSON record instead of the text")
    g.set_defaults(func=_generate)

    i = sub.add_parser("inspect", help="print an artifact's manifest readably",
                       description="Show an artifact's source, stages, files, inputs/outputs, validation and benchmark.")
    i.add_argument("artifact", help="variant folder (newest version) or version folder")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the files")
    i.set_defaults(func=_inspect)

    b = sub.add_parser("bench", help="benchmark a recipe's variants (prefill, decode, RSS, size)",
                       description="Each variant in its own process, measured in one run; prints a table, saves JSON + PNG "
                                   "and records the figures in each manifest.")
    what = b.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", help="benchmark every built variant of this recipe")
    what.add_argument("--artifact", action="append", help="NAME=PATH of one artifact (repeatable)")
    b.add_argument("--artifacts", default="artifacts", help="artifacts root (default: artifacts)")
    b.add_argument("--runs", type=int, default=100, help="timed runs per variant (default 100)")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    b.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    b.add_argument("--new-tokens", type=int, default=50, help="tokens decoded per run (default 50)")
    b.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    b.add_argument("--out", help="folder for bench.json and bench.png (default: artifacts/<recipe>/bench/manual)")
    b.set_defaults(func=_bench)

    bu = sub.add_parser("build", help="build recipes (same as `doit build`)",
                        description="Build the default recipes, or the named ones, through doit (incremental).")
    bu.add_argument("recipes", nargs="*", help="recipe names (files in recipes/ without .yaml); default: the default ones")
    bu.add_argument("--dodo", default="dodo.py", help="path to dodo.py (default: ./dodo.py)")
    bu.set_defaults(func=_build)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .config import RecipeError
    from .runtime.artifact import ArtifactError

    try:
        return args.func(args)
    except (ArtifactError, RecipeError, ValueError, FileNotFoundError) as exc:
        print(f"onnxforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"onnxforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
