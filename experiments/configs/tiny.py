"""Smoke-test config: the tiny test backbone, small grids, few examples per split."""

from experiments.configs.common import method, suite_config


def get_config(arg=None):
    config = suite_config(arg, backbone="tiny", family="random_tiny")
    config.methods = [method("task_arithmetic", alphas=(0.5, 1.0, 1.5)),
                      method("task_arithmetic", boost=True, alphas=(0.5, 1.0, 1.5)),
                      method("consensus", alphas=(0.5, 1.0))]
    config.methods[2]["tall_lambdas"] = (0.2, 0.4)
    config.batch_size = 4
    config.max_validation_examples = 8
    config.max_test_examples = 8
    config.cache_test = True
    return config
