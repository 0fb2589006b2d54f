"""Report stage: the HTML page (``skinsweep report``): its tables, plots, Grad-CAM heat maps and template."""
