"""`make mutation`'s summary of mutmut's results (mutants/): the score of each mutated module, its
surviving mutants with their diffs, and a non-zero exit below the target.

mutmut prints one status per mutant and a global count; the per-module score, with the survivors
judged equivalent (tests/equivalent_mutants.txt: a mutant name, then why it cannot be killed) left
out of it, is ours. Run from the repository root, after `mutmut run`, with the same name patterns
if it had any (`make mutation MUTANTS=...`): the mutants they select are the ones reported.
"""

from __future__ import annotations

import fnmatch
import sys
from collections import Counter
from pathlib import Path

from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

TARGET = 0.85  # share of the non-equivalent mutants of each module that the fast tests kill
EQUIVALENT = Path(__file__).with_name("equivalent_mutants.txt")
KILLED = {"killed", "timeout", "caught by type check"}


def equivalent_mutants() -> dict[str, str]:
    """mutant name -> why it is equivalent, from EQUIVALENT (# starts a comment line)."""
    reasons = {}
    for number, line in enumerate(EQUIVALENT.read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            if not reason.strip():
                sys.exit(f"{EQUIVALENT.name}:{number}: {name} needs a reason after its name")
            reasons[name] = reason.strip()
    return reasons


def changed_lines(name: str, path: Path) -> str:
    """The mutant as its removed and added lines, one line each."""
    diff = get_diff_for_mutant(name, path=path).splitlines()
    return "  |  ".join(line.strip() for line in diff if line[:1] in "-+" and line[:3] not in ("---", "+++"))


def main(patterns: list[str]) -> int:
    equivalent = equivalent_mutants()
    seen: set[str] = set()
    rows, survivors, stale = [], [], []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        if not data.exit_code_by_key:
            continue
        counts = Counter()
        for name, code in sorted(data.exit_code_by_key.items()):
            seen.add(name)
            if patterns and not any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
                continue  # as `mutmut run <patterns>` matches its mutants
            status = status_by_exit_code[code]
            if name in equivalent:
                counts["equivalent"] += 1
                if status in KILLED:
                    stale.append(f"{name} is listed as equivalent but was killed: remove it from the list")
            elif status in KILLED:
                counts["killed"] += 1
            elif status == "not checked":  # an interrupted run: neither killed nor survived
                counts["not checked"] += 1
            else:
                counts["survived"] += 1
                survivors.append(f"{name} ({status}): {changed_lines(name, path)}")
        if not counts:
            continue
        judged = counts["killed"] + counts["survived"]
        score = counts["killed"] / judged if judged else None  # nothing judged yet: no score
        rows.append((path.stem, sum(counts.values()), counts["killed"], counts["survived"],
                     counts["equivalent"], counts["not checked"], score))
    if not rows:
        sys.exit("no mutation results in mutants/: run `mutmut run` first (make mutation)")
    stale += [f"{name} is listed as equivalent but is no mutant now: re-check the list"
              for name in sorted(set(equivalent) - seen)]

    print(f"{'module':<14}{'mutants':>8}{'killed':>8}{'survived':>10}{'equivalent':>12}{'unchecked':>11}"
          f"{'score':>8}")
    for module, total, killed, survived, same, unchecked, score in rows:
        shown = "n/a" if score is None else f"{score:.1%}"
        print(f"{module:<14}{total:>8}{killed:>8}{survived:>10}{same:>12}{unchecked:>11}{shown:>8}")
    for title, lines in (("surviving mutants", survivors), ("list of equivalent mutants", stale)):
        if lines:
            print(f"\n{title}:", *lines, sep="\n  ")
    below = [module for module, *_, score in rows if score is not None and score < TARGET]
    if below:
        print(f"\nbelow the {TARGET:.0%} target: {', '.join(below)}")
    unchecked = sum(row[5] for row in rows)
    if unchecked:
        print(f"\n{unchecked} mutants not checked (an interrupted run): `mutmut run` again to finish it")
    return 1 if below or stale or unchecked else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
