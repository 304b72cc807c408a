"""sdrt: an optimized, torch-free Stable Diffusion runtime."""

from sdrt.errors import SdrtError

__version__ = "0.1.0"
__all__ = ["SdrtError", "__version__"]
