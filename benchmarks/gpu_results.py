"""Compose the committed results of a GPU lease from what ``benchmarks/gpu_suite.sh`` sent back.

    python benchmarks/gpu_results.py --out benchmarks/results/2026-11-30-h200 \
        --note notes.md --commit 8cc9d4b=RUN1 --commit 10deac1=RUN2 RUN1 RUN2

Each RUN is a folder with ``gpu_suite.tgz`` unpacked (``summary.txt``, ``env.txt``, ``tests.log``,
``sanitizer-*.txt``, one folder of bench JSON per bench stage). Writes ``OUT.md`` (the note, then
per run: environment, each stage's outcome, the test failures, the sanitizer's verdict, every
bench table) and ``OUT.json`` (the same as data: stages, failures, bench rows with their
environment). ``--commit`` names the commit whose working tree a run used (the device machine's
copy may report an older HEAD)."""
from __future__ import annotations

import argparse
import glob
import json
import os
import re


def _stages(summary: str):
    """[(stage, rc, seconds, interrupted)] from summary.txt."""
    out = []
    for m in re.finditer(r"^== (\S+): (?:rc=(\d+) in (\d+)s( \(interrupted at its limit\))?|(skipped, budget spent))",
                         summary, re.M):
        if m.group(5):
            out.append(dict(stage=m.group(1), skipped=True))
        else:
            out.append(dict(stage=m.group(1), rc=int(m.group(2)), seconds=int(m.group(3)),
                            interrupted=bool(m.group(4))))
    return out


def _tests(log: str):
    """(the pytest summary line, [failed test ids])."""
    summary = ""
    for line in log.splitlines():
        if re.search(r"\d+ (passed|failed)", line) and " in " in line:
            summary = line.strip("= ")
    failed = sorted(set(re.findall(r"^FAILED (.+?)(?: - .*)?$", log, re.M)))
    return summary, failed


def _run(folder: str, commit: str):
    def read(name):
        path = os.path.join(folder, name)
        return open(path).read() if os.path.exists(path) else ""

    run = dict(folder=os.path.basename(folder.rstrip("/")), commit=commit, env=read("env.txt").strip(),
               stages=_stages(read("summary.txt")))
    if read("tests.log"):
        run["tests"], run["failed"] = _tests(read("tests.log"))
    san = sorted(glob.glob(os.path.join(folder, "sanitizer-*.txt")))
    if san:
        text = open(san[-1]).read()
        run["sanitizer"] = [line for line in text.splitlines() if line.startswith("== ") or "ERROR SUMMARY" in line]
    run["bench"] = []
    for path in sorted(glob.glob(os.path.join(folder, "bench-*", "*.json"))):
        data = json.load(open(path))
        md = path[:-5] + ".md"
        run["bench"].append(dict(stage=os.path.basename(os.path.dirname(path)), environment=data["environment"],
                                 rows=data["rows"], table=open(md).read() if os.path.exists(md) else ""))
    return run


def _markdown(runs, note: str) -> str:
    out = [note.rstrip(), ""] if note else []
    for i, run in enumerate(runs, 1):
        out += [f"## Run {i}: working tree of commit {run['commit']}", "", "```", run["env"], "```", "",
                "| stage | outcome |", "|---|---|"]
        for s in run["stages"]:
            what = "skipped (budget spent)" if s.get("skipped") else (
                f"rc {s['rc']} in {s['seconds']} s" + (", interrupted at its limit" if s["interrupted"] else ""))
            out.append(f"| {s['stage']} | {what} |")
        out.append("")
        if "tests" in run:
            out += [f"**Tests:** {run['tests']}", ""]
            if run["failed"]:
                out += [f"Failed ({len(run['failed'])}):", ""] + [f"- `{t}`" for t in run["failed"]] + [""]
        if "sanitizer" in run:
            out += ["**compute-sanitizer:** " + "; ".join(run["sanitizer"]), ""]
        for b in run["bench"]:
            table = b["table"]
            table = table[table.find("\n- date"):] if "\n- date" in table else table
            out += [f"### {b['stage']}", table.strip(), ""]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path without extension")
    ap.add_argument("--note", help="a Markdown file put at the top")
    ap.add_argument("--commit", action="append", default=[], help="COMMIT=RUN_FOLDER")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args(argv)
    commits = dict(reversed(c.split("=", 1)) for c in args.commit)
    runs = [_run(f, commits.get(f, "unknown")) for f in args.runs]
    note = open(args.note).read() if args.note else ""
    with open(args.out + ".md", "w") as f:
        f.write(_markdown(runs, note))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(note=note, runs=runs), f, indent=1)
    print(f"wrote {args.out}.md and {args.out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
