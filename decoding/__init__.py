"""Turning a trained LVLM into captions: greedy decoding and sampling. Imports nothing from the top level."""
