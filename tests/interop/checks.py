"""The interop scripts' scorekeeping: named checks, printed as they pass or fail."""
import sys

_counts = {"passed": 0, "failed": 0}


def check(name, ok, detail=""):
    """Records one check; prints `ok` or `FAIL` with the detail."""
    if ok:
        _counts["passed"] += 1
        print(f"ok   {name}")
    else:
        _counts["failed"] += 1
        print(f"FAIL {name}: {detail}")


def finish(label):
    """Prints the tally and exits non-zero if any check failed."""
    print(f"{label}: {_counts['passed']} passed, {_counts['failed']} failed")
    sys.exit(1 if _counts["failed"] else 0)
