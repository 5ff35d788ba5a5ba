"""Bridges to other toolkits. Each lives in its own module and is imported explicitly, so that
``import zmask`` never loads them:

* :mod:`zmask.integrations.art` - the Adversarial Robustness Toolbox (``pip install 'zmask[art]'``):
  Z-Mask as an ART preprocessor defence (``ZMaskPreprocessor``) and evasion detector
  (``ZMaskDetector``).
"""
