"""Mutation check: the default test run must fail on each deliberately broken op.

    python -m tests.mutation_check [--mutations perturb_,sumsq] [--backends cpp,reference]

For every mutation of tests/mutants.py and every backend that runs on the CPU (reference
and each fast one; triton under the interpreter), runs the default test selection (the
same tests as ``python -m pytest``, ordered so the ops tests come first) with the mutant
installed and ``-x``, and requires pytest to report a failed test: exit status 1 with a
FAILED line. A run that passes, is interrupted, or stops on a collection or setup error
makes this check fail, and so does a catching test that also fails without the mutant
(a control run of those tests, unmutated, must pass). Prints which test caught each
mutant; exits 1 if any escaped or the control failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600


def cpu_backends() -> list[str]:
    """reference plus every fast backend available on the CPU, as the tests see them."""
    code = ("import tests.conftest as c; print(','.join(['reference'] + c.fast_backends('cpu')))")
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    env.pop("FASTSAM_MUTANT", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return out.stdout.strip().splitlines()[-1].split(",")


def _pythonpath() -> str:
    return os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def run_with_mutant(mutation: str, backend: str) -> tuple[bool, str, float]:
    """(caught, what pytest said, seconds) for one mutant."""
    env = {**os.environ, "FASTSAM_MUTANT": f"{mutation}:{backend}", "PYTHONPATH": _pythonpath()}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    started = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    seconds = time.perf_counter() - started
    text = out.stdout + out.stderr
    if f"MUTANT installed, {backend} backend with {mutation} broken" not in text:
        return False, "the mutant was not installed (no header line):\n" + text[-2000:], seconds
    failed = re.findall(r"^FAILED (\S+)", out.stdout, flags=re.MULTILINE)
    errors = re.findall(r"^ERROR (\S+)", out.stdout, flags=re.MULTILINE)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "(no output)"
    if out.returncode == 1 and failed and not errors:
        return True, failed[0], seconds
    if out.returncode == 0:
        return False, f"the run passed: {summary}", seconds
    return False, f"exit status {out.returncode}, not a test failure: {summary}\n" + text[-2000:], seconds


def run_without_mutant(test_ids: list[str]) -> tuple[bool, str]:
    """(all passed, pytest's summary) for ``test_ids`` run without a mutant."""
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    env.pop("FASTSAM_MUTANT", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *test_ids]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "(no output)"
    passed = out.returncode == 0 and re.search(rf"\b{len(test_ids)} passed\b", summary) is not None
    return passed, summary + ("" if passed else "\n" + (out.stdout + out.stderr)[-3000:])


def main(argv=None) -> int:
    from tests.mutants import DESCRIPTIONS, MUTATIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", default=",".join(MUTATIONS), help="comma-separated (default: all)")
    parser.add_argument("--backends", default=None, help="comma-separated (default: reference + every CPU backend)")
    args = parser.parse_args(argv)
    mutations = [m for m in args.mutations.split(",") if m]
    unknown = [m for m in mutations if m not in MUTATIONS]
    if unknown:
        parser.error(f"unknown mutations {unknown}; choose from {', '.join(MUTATIONS)}")
    backends = [b for b in args.backends.split(",") if b] if args.backends else cpu_backends()

    escaped, catchers = [], []
    started = time.perf_counter()
    for mutation in mutations:
        for backend in backends:
            caught, detail, seconds = run_with_mutant(mutation, backend)
            verdict = "caught " if caught else "ESCAPED"
            print(f"{verdict} {backend:>9} | {DESCRIPTIONS[mutation]:<48} | {seconds:5.1f} s | {detail}", flush=True)
            if caught:
                catchers.append(detail)
            else:
                escaped.append(f"{mutation}:{backend}")
    # Control: the tests that caught a mutant pass without it (else they caught nothing).
    control_ok = True
    if catchers:
        passed, detail = run_without_mutant(sorted(set(catchers)))
        print(f"control: the {len(set(catchers))} catching tests without a mutant: {detail}")
        control_ok = passed
    total = time.perf_counter() - started
    print(f"{len(mutations) * len(backends) - len(escaped)} of {len(mutations) * len(backends)} mutants "
          f"caught in {total:.0f} s")
    if escaped:
        print(f"mutants the default test run did not catch: {', '.join(escaped)}", file=sys.stderr)
    if not control_ok:
        print("the tests that caught the mutants fail without them too: fix them first", file=sys.stderr)
    return 0 if not escaped and control_ok else 1


if __name__ == "__main__":
    sys.exit(main())
