"""Run by tests/test_ddp.py under ``torchrun --nproc_per_node 2``: one epoch of each method named on the command line
(tiny data from the environment, one process group for all of them); every rank dumps its final nets and method
state to ``<dump>/<method>/rank<r>.pth`` and rank 0 writes ``<dump>/<method>/error`` when a method fails."""
import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine  # noqa: E402
from conftest import FAST  # noqa: E402
from test_methods_common import EXTRA_FLAGS, method_class  # noqa: E402
from utils import distributed  # noqa: E402
from utils.runinfo import build_parser, resolve_config  # noqa: E402

if __name__ == "__main__":
    dump_root, methods = sys.argv[1], sys.argv[2:]
    distributed.init_from_env("cpu")
    for name in methods:
        cls = method_class(name)
        os.environ["DHC_DDP_DUMP"] = os.path.join(dump_root, name)
        argv = FAST + EXTRA_FLAGS.get(name, []) + ["--exp", f"all_{name}", "-ep", "0"]
        try:
            engine.Trainer(cls, resolve_config(cls, build_parser(cls).parse_args(argv))).fit()
        except Exception:  # noqa: BLE001 - reported to the test, which fails naming the method
            os.makedirs(os.environ["DHC_DDP_DUMP"], exist_ok=True)
            with open(os.path.join(os.environ["DHC_DDP_DUMP"], f"error{distributed.rank()}"), "w") as f:
                f.write(traceback.format_exc())
    distributed.shutdown()
