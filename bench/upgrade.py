"""The longest producer enqueue while `alembic upgrade head` runs on a full outbox, against no upgrade at all.

    python bench/upgrade.py [--rows 1000000] [--postgres URL]

An outbox of the first release (schema 0001) holding ROWS pending rows (the default backlog bound);
three producer processes (one of release 0.1.0, two of this one) spill at ~200 jobs/s each while
the deploy's upgrade runs. The baseline is the same producers for the same outbox, no upgrade.
Also timed: the first form of revision 0002 (release 0.2.0), run alone on the same outbox: it
rebuilt the table, holding SQLite's write lock (and Postgres's ACCESS EXCLUSIVE lock) throughout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE.parent / "tests" / "faults"), str(HERE.parent / "tests")]

from releases import alembic_upgrade, populated_first_release_outbox, release_tree  # noqa: E402
from servers import create_database, postgres_url  # noqa: E402
from upgrade_load import upgrade_under_load  # noqa: E402


def fresh(kind: str, workdir: Path, name: str, pg: str | None) -> str:
    if kind == "sqlite":
        return f"sqlite:///{workdir / name}.db"
    assert pg is not None
    return create_database(pg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres", default=os.environ.get("SPILLOVER_TEST_POSTGRES_URL") or postgres_url())
    args = parser.parse_args()
    os.environ["SPILLOVER_TARGET"] = "bench"
    os.environ["SPILLOVER_MAX_BACKLOG"] = "0"  # the outbox starts at the default bound; producers add to it
    old, previous = release_tree("0.1.0"), release_tree("0.2.0")
    table = []
    with tempfile.TemporaryDirectory() as tmpdir:
        workdir = Path(tmpdir)
        for kind in ["sqlite"] + (["postgres"] if args.postgres else []):
            names, trees = ["old", "new0", "new1"], {"old": old}
            print(f"{kind}: {args.rows:,} rows, baseline (no upgrade)", flush=True)
            base = upgrade_under_load(
                fresh(kind, workdir, "base", args.postgres),
                args.rows,
                workdir / f"{kind}-base",
                names,
                trees,
                upgrade=False,
            )
            print(f"{kind}: this release's upgrade", flush=True)
            ours = upgrade_under_load(
                fresh(kind, workdir, "ours", args.postgres), args.rows, workdir / f"{kind}-ours", names, trees
            )
            print(f"{kind}: 0.2.0's 0002, alone", flush=True)
            url = fresh(kind, workdir, "first", args.postgres)
            populated_first_release_outbox(url, args.rows)
            started = time.perf_counter()
            alembic_upgrade(previous, url)
            first_form = time.perf_counter() - started
            table.append((kind, ours.upgrade_seconds, ours.longest_enqueue, base.longest_enqueue, first_form))
    print(
        f"\n| outbox ({args.rows:,} pending rows) | upgrade took | longest enqueue during it | "
        "longest enqueue, no upgrade | ratio | 0.2.0's 0002 (rebuild) took |"
    )
    print("|---|---|---|---|---|---|")
    for kind, took, longest, baseline, first_form in table:
        print(
            f"| {kind} | {took:.2f} s | {longest * 1000:,.0f} ms | {baseline * 1000:,.0f} ms | "
            f"{longest / baseline:.1f}x | {first_form:.2f} s |"
        )


if __name__ == "__main__":
    main()
