"""monai_fl_ext: federated, privacy-preserving training of MONAI bundles under NVIDIA FLARE."""

__version__ = "0.1.0"
