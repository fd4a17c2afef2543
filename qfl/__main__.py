"""``python -m qfl warm``: compile qfl's kernels into the per-user cache once."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("warm", help="compile every kernel once (tools/setup.sh runs it after installing)")
    parser.parse_args(argv)
    from .warm import warm

    r = warm()
    print(
        f"qfl warm: {r.compiled} kernel specialisations compiled, {r.loaded} loaded from the cache, "
        f"{r.seconds:.1f} s; cache: {r.cache_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
