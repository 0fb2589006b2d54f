"""Report stage: the HTML page (``skinsweep report``), its plots and Grad-CAM heat maps."""
