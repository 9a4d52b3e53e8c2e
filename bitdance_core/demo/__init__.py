"""The embedded demo model: synthetic scenes (``data``), a detector (``score``), the training recipe
(``train``, ``bitdance train-demo``) and the evaluation (``evaluate``, ``bitdance eval-demo``)."""
