"""dpo-trainer: Direct Preference Optimization and its relatives on any accelerator.

The public API for plugin authors::

    import dpo

    class MyLoss(dpo.Loss):
        name = "my-loss"
        ...

    @dpo.hookimpl
    def dpo_register_losses(register):
        register(MyLoss)
"""

__version__ = "0.1.0"

from dpo.core.interfaces.backend import Backend, MemoryStats  # noqa: E402
from dpo.core.interfaces.data_format import (DataFormat, Demonstration, LabeledCompletion,  # noqa: E402
                                             PreferencePair, UnusableRecord)
from dpo.core.interfaces.errors import DataError, DpoError, UsageError  # noqa: E402
from dpo.core.interfaces.hookspecs import hookimpl  # noqa: E402
from dpo.core.interfaces.logger import Logger, RunInfo  # noqa: E402
from dpo.core.interfaces.loss import Loss, LossOutput, PairLogps, UnpairedLogps  # noqa: E402
from dpo.core.interfaces.options import PluginOptions  # noqa: E402
from dpo.core.interfaces.stopping import CONTINUE, Decision, RunContext, StoppingPolicy  # noqa: E402

__all__ = [
    "Backend",
    "CONTINUE",
    "DataError",
    "DataFormat",
    "Decision",
    "Demonstration",
    "DpoError",
    "LabeledCompletion",
    "Logger",
    "Loss",
    "LossOutput",
    "MemoryStats",
    "PairLogps",
    "PluginOptions",
    "PreferencePair",
    "RunContext",
    "RunInfo",
    "StoppingPolicy",
    "UnpairedLogps",
    "UnusableRecord",
    "UsageError",
    "__version__",
    "hookimpl",
]
