"""ViT-B/32: every suite x method x boost cell of the paper table.

    python -m experiments.run_suite --config experiments/configs/vit_b32.py[:suites=8,methods=ties,boost=on] ...
"""

from experiments.configs.common import suite_config


def get_config(arg=None):
    return suite_config(arg, backbone="ViT-B/32")
