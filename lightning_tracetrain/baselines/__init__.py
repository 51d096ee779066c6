"""Baselines from the related papers, computed on the same trained model: Representer Points and TracIn."""
