"""megatron_sdmoe: Mixture-of-Experts pretraining on megatron-core expert parallelism + DeepSpeed ZeRO."""
import logging
import os
import signal
import warnings

# A training worker that the launchers start (they set KEEP_EARLY_STOPS) keeps a stop signal that
# reaches it while it imports torch and megatron-core, seconds before runtime/preemption.py's
# handlers exist, rather than end of it (SIGUSR1's default: exit 138, no requeue). Only there: in
# any other program that imports the package, SIGTERM must go on ending it.
KEEP_EARLY_STOPS = "SDMOE_KEEP_EARLY_STOPS"
# A stop the launcher got before it had started its workers (launch/torchrun.py), which they inherit.
LAUNCHER_STOP = "SDMOE_LAUNCHER_STOP"
early_stops: list[str] = []  # the signals' names, read by runtime/preemption.py
if os.environ.get(KEEP_EARLY_STOPS):
    early_stops += [os.environ[LAUNCHER_STOP]] if os.environ.get(LAUNCHER_STOP) else []
    for _signal in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(_signal, lambda signum, _frame: early_stops.append(signal.Signals(signum).name))

import torch  # noqa: E402  (after the handlers: its import takes seconds)

# DeepSpeed's ZeRO calls torch.distributed.all_gather_into_tensor, which torch deprecates: a warning
# on every rank about code that is DeepSpeed's to change.
warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)
if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator once, when first asked; without CUDA it must be the CPU one.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Notes that are expected without CUDA: no Transformer Engine / Apex, no CUDA runtime.
    warnings.filterwarnings("ignore", message=".*Apex (is|are) not installed")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
