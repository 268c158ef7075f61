"""Score a model on the free shapes world: the generator's held-out split and the independent test set.

    python scripts/eval_shapes.py --model DIR|llava-shapes --out RESULTS [--n N] [--seed S] [--cache DIR]

Builds (once, into a cache folder) N held-out lines of the generator (llavakit.train.scenes) and N
lines of the independent set (tests/shapes_independent.py: its own drawing, wordings and answer
sentences), answers both greedily with the model, scores with the shapes scorer and writes,
per set, RESULTS/<set>.md (the per-category table) and RESULTS/<set>.json, plus RESULTS/summary.md
with both tables. A cached set is keyed by N, the seed and a hash of the code that drew it, so a
changed generator is drawn again and an unchanged one is shared by every model evaluated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the independent set lives beside the tests that check it


def _code_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def _cached(folder: Path, build) -> Path:
    """Run build(tmp) into folder.tmp and rename it once it finished, so a killed build is never reused."""
    if (folder / "done.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    info = build(tmp)
    (tmp / "done.json").write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1), **info}))
    tmp.rename(folder)
    return folder


def build_sets(cache: Path, n: int, seed: int) -> dict[str, Path]:
    """{set name: JSONL path} for the generator's held-out split and the independent set."""
    from shapes_independent import write_independent_set

    from llavakit.train import scenes

    sets = {}
    code = _code_hash(list((ROOT / "llavakit" / "train").glob("scene*.py")))

    def held_out(tmp: Path) -> dict:
        # The smallest train part the generator allows; only test.jsonl is read.
        return {"made": scenes.make_scenes(tmp, n=1, seed=seed, n_test=n, n_videos=0, n_compare=0, per_image=1)}

    sets["generator"] = _cached(cache / f"generator-n{n}-seed{seed}-{code}", held_out) / "test.jsonl"
    code = _code_hash([ROOT / "tests" / "shapes_independent.py"])

    def independent(tmp: Path) -> dict:
        write_independent_set(tmp, n, seed)
        return {}

    sets["independent"] = _cached(cache / f"independent-n{n}-seed{seed}-{code}", independent) / "independent.jsonl"
    return sets


def main(argv: list[str] | None = None) -> int:
    """Build the sets, evaluate the model on each, write the tables; prints the summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-shapes", help="checkpoint folder, hub id or llava-shapes")
    p.add_argument("--out", required=True, type=Path, help="folder for the result tables")
    p.add_argument("--n", type=int, default=420, help="lines per set (the types in turn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llavakit" / "eval_shapes",
                   help="where the drawn sets are kept between runs")
    p.add_argument("--threads", type=int, help="torch threads (default: llavakit's auto rule)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args(argv)

    import llavakit
    from llavakit.cli import set_threads
    from llavakit.train.evaluate import evaluate_file

    sets = build_sets(args.cache, args.n, args.seed)
    if args.threads:
        set_threads(args.threads)
    vlm = llavakit.load(args.model)
    if not args.threads:
        set_threads(None, sum(t.numel() for t in vlm.model.parameters()))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = [f"# {args.model} on the free shapes world (n={args.n} per set, seed {args.seed})", ""]
    for name, data in sets.items():
        result = evaluate_file(vlm, data, max_new_tokens=args.max_new_tokens, score="shapes")
        table = result.category_table()
        report = {"model": args.model, "set": name, "data": str(data), **result.to_json(wrong=len(result.wrong))}
        (args.out / f"{name}.md").write_text(table + "\n")
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        summary += [f"## {name} ({data})", "", table, "",
                    f"{len(result.outcomes)} questions in {result.seconds:.0f} s", ""]
    (args.out / "summary.md").write_text("\n".join(summary))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
