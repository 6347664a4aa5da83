"""Synthetic reference data: scenes with planted OpenMoji concepts and exact masks.

``concepts`` chooses and renders the emoji, ``backgrounds`` draws scikit-image textures
and photographs, ``compose`` pastes layers and derives their masks, and ``scenes``
draws whole scenes and writes them as a COCO dataset.

Emoji artwork is OpenMoji (https://openmoji.org), licensed CC BY-SA 4.0; datasets made
here must carry :data:`OPENMOJI_ATTRIBUTION`.
"""

from lavise.settings import SceneSettings
from lavise.synthetic.concepts import OPENMOJI_ATTRIBUTION, Concept, concept_pool, render_concept
from lavise.synthetic.scenes import generate_scenes

__all__ = [
    "OPENMOJI_ATTRIBUTION",
    "Concept",
    "SceneSettings",
    "concept_pool",
    "generate_scenes",
    "render_concept",
]
