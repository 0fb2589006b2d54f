"""Ensemble stage: recipes, member selection, combiners, calibrators, patient metadata, bootstrap
statistics, the deployment bundle that scores new images, and what comes after deployment: external
validation (:mod:`.evaluate`), site recalibration (:mod:`.recalibrate`) and paired comparison
(:mod:`.compare`)."""
