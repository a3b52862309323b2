"""Programs the tests start as `python -m tests.workers.<name>` in one or more processes
(conftest.launch_module), each measuring one thing on the real training set-up."""
from megatron_sdmoe.config import load_config
from megatron_sdmoe.runtime.distributed import world_size_from_env
from megatron_sdmoe.train import Session, setup
from megatron_sdmoe.validation import validate


def training_session(args: list[str]) -> Session:
    """CONFIG [key=value ...] (`args`) validated and set up as sdmoe-train does it."""
    cfg = load_config(args[0], args[1:])
    validate(cfg, world_size_from_env())
    return setup(cfg)
