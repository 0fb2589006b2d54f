"""Ensemble stage: recipes, member selection, combiners, calibrators, patient metadata, bootstrap
statistics, and the deployment bundle that scores new images."""
