"""megafusion: pretraining unified multimodal transformers (Transfusion family) on megatron-core."""

__version__ = "0.1.0"
