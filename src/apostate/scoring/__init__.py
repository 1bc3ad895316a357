"""How far a trial moved the model: KL divergence from the base on harmless prompts, and refusals
on harmful ones (scorer, refusals); and what is measured once to score well (calibration)."""

from .scorer import Scorer, Scores, build_scorer, scores_line

__all__ = ["Scorer", "Scores", "build_scorer", "scores_line"]
