"""megafusion: pretraining unified multimodal transformers (Transfusion family) on megatron-core."""

__version__ = "0.1.0"

from megafusion.version_check import check_megatron_core as _check_megatron_core  # noqa: E402

_check_megatron_core()  # warns once when the installed megatron-core is outside the tested range
