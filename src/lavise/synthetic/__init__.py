"""Synthetic reference data: scenes with planted OpenMoji concepts and exact masks.

Emoji artwork is OpenMoji (https://openmoji.org), licensed CC BY-SA 4.0; datasets made
here must carry :data:`OPENMOJI_ATTRIBUTION`.
"""

from lavise.synthetic.concepts import OPENMOJI_ATTRIBUTION, Concept, concept_pool, render_concept
from lavise.synthetic.scenes import SceneSettings, generate_scenes

__all__ = [
    "OPENMOJI_ATTRIBUTION",
    "Concept",
    "SceneSettings",
    "concept_pool",
    "generate_scenes",
    "render_concept",
]
