"""Scores of a model's outputs that need no model: BLEU and CIDEr-D of captions, retrieval ranks
from likelihoods, and the objects a shapes caption names (hallucination, recall, exact)."""
