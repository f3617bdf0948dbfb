"""Access to the repository-root ``config.py`` from code under ``code/``.

Scripts run as ``python code/<script>.py`` have ``code/`` but not the repository root on ``sys.path``; the
configuration is loaded from its file, once, on first use."""
import importlib.util
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MODULE_NAME = "dhc_config"


def config_module():
    module = sys.modules.get(_MODULE_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(_MODULE_NAME, os.path.join(REPO_ROOT, "config.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE_NAME] = module
        spec.loader.exec_module(module)
    return module


def get_task(name):
    """``config.get_task(name)``; an unknown name raises ConfigError listing the valid ones."""
    from utils.io import ConfigError
    try:
        return config_module().get_task(name)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None


def task_names():
    return config_module().TASK_NAMES
