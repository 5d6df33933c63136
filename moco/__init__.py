"""moco: Momentum Contrast (MoCo v1/v2) self-supervised pretraining.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020;
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv 2003.04297.
"""

from moco.core.model import MoCo
from moco.engine.config import MocoConfig

__all__ = ["MoCo", "MocoConfig"]
__version__ = "0.1.0"
