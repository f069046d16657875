"""Scene graphs and language generated from them: object captions, scene captions and referrals
whose uniqueness is checked on the geometry."""
from .checker import REFERRAL_SHAPES, Anchor, CheckResult, Clause, Referral, check_referral, distractors, satisfying
from .colors import NAMED_COLORS, color_name, color_names
from .generate import GeneratedLanguage, LanguageConfig, annotate_scene, generate_language, language_rng
from .relations import ALL_RELATIONS, RelationThresholds
from .scene_graph import STRUCTURAL_LABELS, SceneGraph, build_scene_graph, guess_room_type

__all__ = [
    "ALL_RELATIONS", "Anchor", "CheckResult", "Clause", "GeneratedLanguage", "LanguageConfig", "NAMED_COLORS",
    "REFERRAL_SHAPES", "Referral", "RelationThresholds", "STRUCTURAL_LABELS", "SceneGraph", "annotate_scene",
    "build_scene_graph", "check_referral", "color_name", "color_names", "distractors", "generate_language",
    "guess_room_type", "language_rng", "satisfying",
]
