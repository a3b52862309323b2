from megatron_sdmoe.runtime.distributed import Layout, init_distributed, seed_everything, shutdown

__all__ = ["Layout", "init_distributed", "seed_everything", "shutdown"]
